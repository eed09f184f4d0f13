package ehrlake;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.attribute.PosixFilePermission;
import java.security.GeneralSecurityException;
import java.util.Arrays;
import java.util.Base64;
import java.util.EnumSet;
import java.util.Set;

import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Data keys unwrapped where a task runs, as {@code ehrlake.security.keys.KeyStore.get} does in
 * Python: the task is given the key store's location and a key id, never key material, so no key
 * enters the query plan, Spark's event log or its UI.
 *
 * <p>A key file {@code <store>/<table>.keys.json} lists versions, each {@code wrapped} = base64(nonce
 * | AES-256-GCM(master key, data key, associated data = key id)). The master key is the 0600 file
 * named, or base64 in {@code $EHRLAKE_MASTER_KEY} when no file is named.
 */
final class DataKeys {
  static final int KEY_BYTES = 32;
  static final String ENV = "EHRLAKE_MASTER_KEY";
  private static final Set<PosixFilePermission> OTHERS =
      EnumSet.of(
          PosixFilePermission.GROUP_READ, PosixFilePermission.GROUP_WRITE,
          PosixFilePermission.GROUP_EXECUTE, PosixFilePermission.OTHERS_READ,
          PosixFilePermission.OTHERS_WRITE, PosixFilePermission.OTHERS_EXECUTE);

  /** A failure the Python side turns back into its KeyAccessError (by this class's name). */
  static final class KeyAccessError extends RuntimeException {
    KeyAccessError(String message) {
      super(message);
    }
  }

  private DataKeys() {}

  /** The material of data key {@code keyId} from the store at {@code store}. */
  static byte[] unwrap(String store, String masterFile, String keyId) {
    String table = keyId.substring(0, keyId.lastIndexOf('#'));
    Path file = Paths.get(store, table + ".keys.json");
    JsonNode wrapped = null;
    try {
      if (Files.isRegularFile(file)) {
        for (JsonNode version : new ObjectMapper().readTree(file.toFile()).path("versions")) {
          if (keyId.equals(version.path("key_id").asText())) {
            wrapped = version.path("wrapped");
          }
        }
      }
    } catch (IOException e) {
      throw new KeyAccessError("table " + table + ": key file " + file + " cannot be read (" + e.getMessage() + ")");
    }
    if (wrapped == null) {
      throw new KeyAccessError("table " + table + ": data key " + keyId + " is not in the key store " + store);
    }
    byte[] blob = Base64.getDecoder().decode(wrapped.asText());
    try {
      Cipher aes = Cipher.getInstance("AES/GCM/NoPadding");
      aes.init(
          Cipher.DECRYPT_MODE,
          new SecretKeySpec(masterKey(masterFile), "AES"),
          new GCMParameterSpec(128, blob, 0, 12));
      aes.updateAAD(keyId.getBytes(StandardCharsets.UTF_8));
      return aes.doFinal(blob, 12, blob.length - 12);
    } catch (GeneralSecurityException e) {
      throw new KeyAccessError(
          "table " + table + ": data key " + keyId + " cannot be unwrapped with the master key from "
              + (masterFile == null ? "environment variable " + ENV : "file " + masterFile)
              + " (wrong master key?)");
    }
  }

  private static byte[] masterKey(String masterFile) {
    byte[] raw;
    String where;
    if (masterFile == null) {
      String value = System.getenv(ENV);
      if (value == null || value.isEmpty()) {
        throw new KeyAccessError("environment variable " + ENV + " holds no master key");
      }
      raw = value.getBytes(StandardCharsets.US_ASCII);
      where = "$" + ENV;
    } else {
      Path path = Paths.get(masterFile);
      try {
        if (!Files.isRegularFile(path)) {
          throw new KeyAccessError("master key file " + path + " does not exist (run: ehrlake keys init)");
        }
        Set<PosixFilePermission> mode = Files.getPosixFilePermissions(path);
        mode.retainAll(OTHERS);
        if (!mode.isEmpty()) {
          throw new KeyAccessError("master key file " + path + " is readable by others; chmod 600 it");
        }
        raw = strip(Files.readAllBytes(path));
      } catch (IOException e) {
        throw new KeyAccessError("master key file " + path + " cannot be read (" + e.getMessage() + ")");
      }
      where = masterFile;
    }
    if (raw.length == KEY_BYTES) {
      return raw;
    }
    byte[] key;
    try {
      key = Base64.getDecoder().decode(raw);
    } catch (IllegalArgumentException e) {
      throw new KeyAccessError("master key in " + where + " is neither 32 raw bytes nor base64");
    }
    if (key.length != KEY_BYTES) {
      throw new KeyAccessError("master key in " + where + " must be 32 bytes, not " + key.length);
    }
    Arrays.fill(raw, (byte) 0);
    return key;
  }

  /** Without leading and trailing ASCII whitespace, as Python's bytes.strip(). */
  private static byte[] strip(byte[] bytes) {
    int start = 0;
    int end = bytes.length;
    while (start < end && isSpace(bytes[start])) {
      start++;
    }
    while (end > start && isSpace(bytes[end - 1])) {
      end--;
    }
    return Arrays.copyOfRange(bytes, start, end);
  }

  private static boolean isSpace(byte b) {
    return b == ' ' || (b >= 9 && b <= 13);
  }
}
