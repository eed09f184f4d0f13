package ehrlake;

import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.spark.sql.SparkSession;
import org.apache.spark.sql.catalyst.analysis.NoSuchNamespaceException;
import org.apache.spark.sql.catalyst.analysis.NoSuchTableException;
import org.apache.spark.sql.connector.catalog.Identifier;
import org.apache.spark.sql.connector.catalog.Table;
import org.apache.spark.sql.delta.catalog.DeltaCatalog;

/**
 * Spark's session catalog, with Delta Lake's, that also knows the lake's tables by name.
 *
 * <p>{@code silver.condition} is the Delta table at {@code <root>/silver/condition}, where the root is
 * the session setting {@code spark.ehrlake.lake.root} (set by {@code lake.open}). Nothing is
 * registered: a name is looked up in the lake when a statement uses it, so a table another job has
 * just written is there at once, and opening a lake costs nothing. A name the session's own catalog
 * (in-memory, or a shared Hive metastore) holds wins: a metastore that registers the lake's tables,
 * or a role's views ({@code ehrlake sql}), comes first.
 */
public class LakeCatalog extends DeltaCatalog {
  public static final String ROOT = "spark.ehrlake.lake.root";
  static final List<String> LAYERS = Arrays.asList("bronze", "silver", "gold", "ops", "audit");

  private static String root() {
    String root = SparkSession.active().conf().get(ROOT, "");
    return root.isEmpty() ? null : root;
  }

  /** The lake's directory for a layer name, or null when it is not a layer of a configured lake. */
  private static File layerDir(String[] namespace) {
    String root = root();
    if (root == null || namespace.length != 1 || !LAYERS.contains(namespace[0])) {
      return null;
    }
    return new File(root, namespace[0]);
  }

  /** The lake table for an identifier, or null when the lake has none by that name. */
  private static File tableDir(Identifier ident) {
    File layer = layerDir(ident.namespace());
    if (layer == null || !ident.name().matches("[a-z][a-z0-9_]*")) {
      return null;
    }
    File table = new File(layer, ident.name());
    return new File(table, "_delta_log").isDirectory() ? table : null;
  }

  private static Identifier pathIdentifier(File table) {
    return Identifier.of(new String[] {"delta"}, table.getAbsolutePath());
  }

  /** How a load is tried: by the name as given, then, when the catalog has no such table, by path. */
  private interface Load {
    Table apply(Identifier ident) throws Exception;
  }

  private static Table inCatalogOrLake(Identifier ident, Load load) {
    try {
      return load.apply(ident);
    } catch (Exception missing) {
      File table = missing instanceof NoSuchTableException ? tableDir(ident) : null;
      if (table == null) {
        throw LakeCatalog.<RuntimeException>rethrow(missing);
      }
      try {
        return load.apply(pathIdentifier(table));
      } catch (Exception failed) {
        throw LakeCatalog.<RuntimeException>rethrow(failed);
      }
    }
  }

  /** Scala declares no checked exceptions, so Spark's own (checked in Java) pass through unchanged. */
  @SuppressWarnings("unchecked")
  private static <E extends Exception> E rethrow(Exception e) throws E {
    throw (E) e;
  }

  @Override
  public Table loadTable(Identifier ident) {
    return inCatalogOrLake(ident, super::loadTable);
  }

  @Override
  public Table loadTable(Identifier ident, long timestamp) {
    return inCatalogOrLake(ident, id -> super.loadTable(id, timestamp));
  }

  @Override
  public Table loadTable(Identifier ident, String version) {
    return inCatalogOrLake(ident, id -> super.loadTable(id, version));
  }

  @Override
  public boolean tableExists(Identifier ident) {
    return super.tableExists(ident) || tableDir(ident) != null;
  }

  @Override
  public Identifier[] listTables(String[] namespace) throws NoSuchNamespaceException {
    File layer = layerDir(namespace);
    Set<Identifier> found = new LinkedHashSet<>();
    try {
      found.addAll(Arrays.asList(super.listTables(namespace)));
    } catch (NoSuchNamespaceException missing) {
      if (layer == null) {
        throw missing;
      }
    }
    String[] entries = layer == null ? null : layer.list();
    if (entries != null) {
      Arrays.sort(entries);
      for (String entry : entries) {
        Identifier ident = Identifier.of(namespace, entry);
        if (tableDir(ident) != null) {
          found.add(ident);
        }
      }
    }
    return found.toArray(new Identifier[0]);
  }

  @Override
  public String[][] listNamespaces() throws NoSuchNamespaceException {
    List<String[]> all = new ArrayList<>(Arrays.asList(super.listNamespaces()));
    if (root() != null) {
      for (String layer : LAYERS) {
        boolean listed = all.stream().anyMatch(ns -> ns.length == 1 && ns[0].equals(layer));
        if (!listed && new File(root(), layer).isDirectory()) {
          all.add(new String[] {layer});
        }
      }
    }
    return all.toArray(new String[0][]);
  }

  @Override
  public Map<String, String> loadNamespaceMetadata(String[] namespace) throws NoSuchNamespaceException {
    try {
      return super.loadNamespaceMetadata(namespace);
    } catch (NoSuchNamespaceException missing) {
      File layer = layerDir(namespace);
      if (layer == null) {
        throw missing;
      }
      return Collections.singletonMap("location", layer.toURI().toString());
    }
  }
}
