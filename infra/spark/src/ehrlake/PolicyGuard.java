package ehrlake;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.WeakHashMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.LinkedBlockingQueue;

import org.apache.spark.SparkContext;
import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerEvent;
import org.apache.spark.sql.SparkSessionExtensions;
import org.apache.spark.sql.catalyst.expressions.Expression;
import org.apache.spark.sql.catalyst.expressions.SubqueryExpression;
import org.apache.spark.sql.catalyst.expressions.UserDefinedExpression;
import org.apache.spark.sql.catalyst.plans.logical.Command;
import org.apache.spark.sql.catalyst.plans.logical.LocalRelation;
import org.apache.spark.sql.catalyst.plans.logical.LogicalPlan;
import org.apache.spark.sql.catalyst.plans.logical.OneRowRelation;
import org.apache.spark.sql.catalyst.plans.logical.Range;
import org.apache.spark.sql.catalyst.plans.logical.View;
import org.apache.spark.sql.connect.service.SparkListenerConnectOperationCanceled;
import org.apache.spark.sql.connect.service.SparkListenerConnectOperationFailed;
import org.apache.spark.sql.connect.service.SparkListenerConnectOperationFinished;
import org.apache.spark.sql.connect.service.SparkListenerConnectOperationStarted;
import org.apache.spark.sql.hive.thriftserver.ui.SparkListenerThriftServerOperationCanceled;
import org.apache.spark.sql.hive.thriftserver.ui.SparkListenerThriftServerOperationError;
import org.apache.spark.sql.hive.thriftserver.ui.SparkListenerThriftServerOperationFinish;
import org.apache.spark.sql.hive.thriftserver.ui.SparkListenerThriftServerOperationStart;
import org.apache.spark.sql.hive.thriftserver.ui.SparkListenerThriftServerOperationTimeout;

import scala.Function1;
import scala.Option;
import scala.collection.Iterator;
import scala.runtime.BoxedUnit;

/**
 * The access policy where Spark itself runs a statement: what a role's SQL server
 * ({@code ehrlake serve sql}) lets its clients do, and the last check of {@code ehrlake sql}.
 *
 * <p>A plan passes when it only reads the role's views (named by {@link #arm}; what they read is
 * theirs) or data the client sent, and runs no code of the client's: no command (DDL, writes,
 * settings by SQL, caching tables), no user-defined function of any language, no reflection, no
 * script or typed (closure) operator. Anything else is refused at analysis, before it reads a byte.
 *
 * <p>Sessions named trusted (the server's own, which sets the views up and writes the audit log)
 * are not checked. Every client operation (its statement, the views it read, and whether it ran,
 * was refused or failed) becomes an event the Python side drains into the audit log ({@link
 * #drain}); a plan runs only after it passed.
 */
public final class PolicyGuard implements Function1<SparkSessionExtensions, BoxedUnit> {
  // code whose plans are Spark's own work for a client's plan (see internal())
  private static final List<String> INTERNAL = Arrays.asList(
      "org.apache.spark.sql.catalyst.analysis.ViewResolution", // a view's body
      "org.apache.spark.sql.delta.", // Delta Lake reading a table's log
      "org.apache.spark.sql.catalyst.encoders.ExpressionEncoder"); // binding a result's row reader
  private static volatile Set<String> views = null; // null: not armed, nothing is checked
  private static final Set<Object> trusted = Collections.synchronizedSet(
      Collections.newSetFromMap(new WeakHashMap<>()));
  private static final LinkedBlockingQueue<String[]> events = new LinkedBlockingQueue<>();
  private static final String CONNECT_TAG = "SparkConnect_OperationTag_";
  // per running client operation (operationKey): the views its plans read, why one was refused
  private static final Map<String, Set<String>> seen = new ConcurrentHashMap<>();
  private static final Map<String, String> refused = new ConcurrentHashMap<>();

  /** Check every plan of every session but {@code trustedSession} against these views (db.name). */
  public static void arm(String[] allowedViews, Object trustedSession) {
    trusted.add(trustedSession);
    views = Collections.unmodifiableSet(new LinkedHashSet<>(Arrays.asList(allowedViews)));
  }

  /** Check nothing any more. */
  public static void disarm() {
    views = null;
  }

  /** Events since the last call: {outcome, tables, statement or plan, reason}. */
  public static String[][] drain() {
    List<String[]> out = new ArrayList<>();
    events.drainTo(out);
    return out.toArray(new String[0][]);
  }

  @Override
  public BoxedUnit apply(SparkSessionExtensions extensions) {
    extensions.injectCheckRule(session -> plan -> {
      Set<String> allowed = views;
      if (allowed != null && !trusted.contains(session) && !internal()) {
        String reason = violation(plan, allowed);
        String operation = operationKey(session.sparkContext());
        if (operation != null) { // Connect's events for the operation carry the outcome (Operations)
          seen.computeIfAbsent(operation, tag -> new LinkedHashSet<>()).addAll(viewsRead(plan));
          if (reason != null) {
            refused.put(operation, reason);
          }
        } else if (reason != null) { // a schema or explain request: refusals are recorded too
          events.add(new String[] {"denied", String.join(",", viewsRead(plan)), statement(plan), reason});
        }
        if (reason != null) {
          throw new SecurityException("ehrlake: " + reason);
        }
      }
      return BoxedUnit.UNIT;
    });
    return BoxedUnit.UNIT;
  }

  /**
   * The client operation this thread runs for, or null: a Spark Connect operation by its job tag, a
   * JDBC statement by its job group (the Thrift server makes one per statement).
   */
  private static String operationKey(SparkContext context) {
    Iterator<String> tags = context.getJobTags().iterator();
    while (tags.hasNext()) {
      String tag = tags.next();
      if (tag.startsWith(CONNECT_TAG)) {
        return tag;
      }
    }
    return context.getLocalProperty("spark.jobGroup.id");
  }

  /** Starts recording client operations (statement, outcome) as events for {@link #drain}. */
  public static void listen(SparkContext context) {
    context.addSparkListener(new Operations());
  }

  /**
   * Each client operation, as Spark Connect and the Thrift JDBC server report it: its statement when
   * it starts, then whether it ran, was refused here, or failed (a name not found, invalid SQL);
   * with the views it read.
   */
  static final class Operations extends SparkListener {
    private final Map<String, String> statements = new ConcurrentHashMap<>(); // by operation key
    private final Map<String, String> groups = new ConcurrentHashMap<>(); // JDBC statement id: key

    @Override
    public void onOtherEvent(SparkListenerEvent event) {
      if (views == null) {
        return;
      }
      if (event instanceof SparkListenerConnectOperationStarted) {
        SparkListenerConnectOperationStarted started = (SparkListenerConnectOperationStarted) event;
        statements.put(started.jobTag(), started.statementText());
      } else if (event instanceof SparkListenerConnectOperationFinished) {
        finished(((SparkListenerConnectOperationFinished) event).jobTag());
      } else if (event instanceof SparkListenerConnectOperationFailed) {
        SparkListenerConnectOperationFailed failed = (SparkListenerConnectOperationFailed) event;
        failed(failed.jobTag(), failed.errorMessage());
      } else if (event instanceof SparkListenerConnectOperationCanceled) {
        failed(((SparkListenerConnectOperationCanceled) event).jobTag(), "canceled");
      } else if (event instanceof SparkListenerThriftServerOperationStart) {
        SparkListenerThriftServerOperationStart started = (SparkListenerThriftServerOperationStart) event;
        groups.put(started.id(), started.groupId());
        statements.put(started.groupId(), started.statement());
      } else if (event instanceof SparkListenerThriftServerOperationFinish) {
        finished(groups.remove(((SparkListenerThriftServerOperationFinish) event).id()));
      } else if (event instanceof SparkListenerThriftServerOperationError) {
        SparkListenerThriftServerOperationError failed = (SparkListenerThriftServerOperationError) event;
        failed(groups.remove(failed.id()), failed.errorMsg());
      } else if (event instanceof SparkListenerThriftServerOperationCanceled) {
        failed(groups.remove(((SparkListenerThriftServerOperationCanceled) event).id()), "canceled");
      } else if (event instanceof SparkListenerThriftServerOperationTimeout) {
        failed(groups.remove(((SparkListenerThriftServerOperationTimeout) event).id()), "timed out");
      }
    }

    private void finished(String key) {
      String reason = key == null ? null : refused.remove(key);
      end(key, reason == null ? "allowed" : "denied", reason);
    }

    private void failed(String key, String error) {
      String reason = key == null ? null : refused.remove(key);
      end(key, reason == null ? "failed" : "denied", reason == null ? error : reason);
    }

    private void end(String tag, String outcome, String reason) {
      if (tag == null) {
        return;
      }
      String statement = statements.remove(tag);
      Set<String> read = seen.remove(tag);
      if (statement == null) {
        return; // ended twice (finished, then closed)
      }
      String text = statement.substring(0, Math.min(statement.length(), 4000));
      events.add(new String[] {outcome, read == null ? "" : String.join(",", read), text, reason});
    }
  }

  /**
   * Whether Spark is checking a plan of its own while it analyses or runs the client's: a view's
   * body (what it reads is the view's; the statement's check decides whether the view is one of
   * this role's), Delta Lake reading a table's log, or the reader of a result's rows bound to its
   * schema. None reaches the client; the client's plan is checked.
   */
  private static boolean internal() {
    return StackWalker.getInstance().walk(frames -> frames.anyMatch(frame -> {
      String name = frame.getClassName();
      return INTERNAL.stream().anyMatch(name::startsWith);
    }));
  }

  /** What is wrong with running {@code plan} for a role that may read {@code allowed}, or null. */
  public static String violation(LogicalPlan plan, Set<String> allowed) {
    if (plan instanceof View) {
      String name = viewName((View) plan);
      return allowed.contains(name) ? null : name + " is not a table this role may read";
    }
    if (plan instanceof Command) { // USE db (JDBC sessions open with it) reads nothing
      return plan.nodeName().equals("SetCatalogAndNamespace") ? null
          : "only queries run here, not " + plan.nodeName();
    }
    String node = plan.getClass().getSimpleName();
    for (String code : new String[] {"Python", "Pandas", "Arrow", "InR", "Script", "Map", "Object",
        "Typed", "CoGroup", "AppendColumns", "WithState"}) {
      if (node.contains(code)) {
        return "client code does not run here (" + node + ")";
      }
    }
    if (plan.children().isEmpty()
        && !(plan instanceof LocalRelation || plan instanceof OneRowRelation || plan instanceof Range
            || node.equals("CTERelationRef"))) {
      return "only this role's tables can be read (not " + node + ")";
    }
    Iterator<Expression> expressions = plan.expressions().iterator();
    while (expressions.hasNext()) {
      String reason = violation(expressions.next(), allowed);
      if (reason != null) {
        return reason;
      }
    }
    Iterator<LogicalPlan> children = plan.children().iterator();
    while (children.hasNext()) {
      String reason = violation(children.next(), allowed);
      if (reason != null) {
        return reason;
      }
    }
    return null;
  }

  public static String violation(LogicalPlan plan, String[] allowed) {
    return violation(plan, new LinkedHashSet<>(Arrays.asList(allowed)));
  }

  private static String violation(Expression expression, Set<String> allowed) {
    String name = expression.getClass().getSimpleName();
    if (expression instanceof UserDefinedExpression || name.contains("UDF") || name.contains("UDAF")
        || name.contains("Python") || name.contains("Reflect") || name.contains("Reflection")) {
      return "client code does not run here (" + expression.prettyName() + ")";
    }
    if (expression instanceof SubqueryExpression) {
      String reason = violation(((SubqueryExpression) expression).plan(), allowed);
      if (reason != null) {
        return reason;
      }
    }
    Iterator<Expression> children = expression.children().iterator();
    while (children.hasNext()) {
      String reason = violation(children.next(), allowed);
      if (reason != null) {
        return reason;
      }
    }
    return null;
  }

  /** The views a plan reads (outermost), as db.name, in the order met. */
  public static List<String> viewsRead(LogicalPlan plan) {
    List<String> found = new ArrayList<>();
    collectViews(plan, found);
    return found;
  }

  private static void collectViews(LogicalPlan plan, List<String> found) {
    if (plan instanceof View) {
      String name = viewName((View) plan);
      if (!found.contains(name)) {
        found.add(name);
      }
      return;
    }
    Iterator<Expression> expressions = plan.expressions().iterator();
    while (expressions.hasNext()) {
      collectViewsIn(expressions.next(), found);
    }
    Iterator<LogicalPlan> children = plan.children().iterator();
    while (children.hasNext()) {
      collectViews(children.next(), found);
    }
  }

  private static void collectViewsIn(Expression expression, List<String> found) {
    if (expression instanceof SubqueryExpression) {
      collectViews(((SubqueryExpression) expression).plan(), found);
    }
    Iterator<Expression> children = expression.children().iterator();
    while (children.hasNext()) {
      collectViewsIn(children.next(), found);
    }
  }

  private static String viewName(View view) {
    Option<String> database = view.desc().identifier().database();
    String table = view.desc().identifier().table();
    return database.isDefined() ? database.get() + "." + table : table;
  }

  /** The SQL text the plan was parsed from where Spark kept it, else the plan's outline. */
  static String statement(LogicalPlan plan) {
    Option<String> text = plan.origin().sqlText();
    if (text.isDefined()) {
      return text.get();
    }
    String outline = plan.treeString();
    return "(plan) " + outline.substring(0, Math.min(outline.length(), 2000));
  }
}
