package ehrlake;

import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

import org.apache.spark.sql.api.java.UDF3;

/**
 * {@code ehrlake_patient_key(source_system, patient_id, spec)}: the pseudonymous patient key,
 * HMAC-SHA256(linkage secret, source system | patient id) in hex, as
 * {@code ehrlake.security.pseudonym.patient_key} computes it. {@code spec} is {@code linkage key id
 * U+001F key store U+001F master key file (empty: $EHRLAKE_MASTER_KEY)}; the secret is unwrapped
 * where the task runs ({@link DataKeys}). A file holds a patient's rows together, so the last
 * patient's key is kept: one HMAC per patient run, not per row.
 */
public final class PatientKey implements UDF3<String, String, String, String> {
  private static final long serialVersionUID = 1L;

  private transient Map<String, Mac> hmacs; // one per spec: a plan's calls share this instance
  private transient Mac hmac;
  private transient String spec;
  private transient String lastSystem;
  private transient String lastPatient;
  private transient String lastKey;

  @Override
  public String call(String system, String patient, String spec) throws GeneralSecurityException {
    if (patient == null) {
      return null;
    }
    if (!spec.equals(this.spec)) {
      if (hmacs == null) {
        hmacs = new HashMap<>();
      }
      hmac = hmacs.get(spec);
      if (hmac == null) {
        String[] parts = spec.split("\u001f", -1);
        hmac = Mac.getInstance("HmacSHA256");
        hmac.init(new SecretKeySpec(DataKeys.unwrap(parts[1], parts[2].isEmpty() ? null : parts[2], parts[0]), "HmacSHA256"));
        hmacs.put(spec, hmac);
      }
      this.spec = spec;
      lastPatient = null;
    }
    if (patient.equals(lastPatient) && java.util.Objects.equals(system, lastSystem)) {
      return lastKey;
    }
    byte[] message = ((system == null ? "None" : system) + "|" + patient).getBytes(StandardCharsets.UTF_8);
    lastKey = HexFormat.of().formatHex(hmac.doFinal(message));
    lastSystem = system;
    lastPatient = patient;
    return lastKey;
  }
}
