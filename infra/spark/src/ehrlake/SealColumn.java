package ehrlake;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.math.BigInteger;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.interfaces.XECPublicKey;
import java.security.spec.NamedParameterSpec;
import java.security.spec.XECPublicKeySpec;
import java.util.Arrays;
import java.util.Base64;
import java.util.HashMap;
import java.util.Map;

import javax.crypto.Cipher;
import javax.crypto.KeyAgreement;
import javax.crypto.Mac;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;

import com.github.luben.zstd.ZstdCompressCtx;
import com.github.luben.zstd.ZstdDictCompress;

import org.apache.spark.sql.api.java.UDF3;

/**
 * {@code ehrlake_seal(row_id, value, spec)}: a column value sealed in the JVM, in the ciphertext
 * formats of {@code ehrlake.security.crypto} (so Python opens it): under a data key, {@code
 * ek1:<key id>:base64(nonce | AES-256-GCM(value, associated data = row id U+001F column))}; to the
 * reveal public key, {@code ek2:<reveal key id>:base64(ephemeral X25519 public key | nonce | ...)}
 * under HKDF-SHA256 of the shared secret; {@code ek1z}/{@code ek2z} of the value compressed first
 * with zstd and the shipped dictionary.
 *
 * <p>Why in the JVM: the Python UDF paid an Arrow round trip and a Python loop per value, about 11 us
 * a row, a fifth of ingest at 100,000 patients. {@code spec} is {@code column U+001F compress (0|1)
 * U+001F key id U+001F key store U+001F master key file (empty: $EHRLAKE_MASTER_KEY) U+001F the
 * reveal public key in base64 (empty: seal under the data key)}: locations, ids and a public key
 * only; a task unwraps its data key itself ({@link DataKeys}), once, or makes an ephemeral key
 * (a fresh one every {@value #PER_EPHEMERAL} values).
 */
public final class SealColumn implements UDF3<String, String, String, String> {
  private static final long serialVersionUID = 1L;
  private static final String SEPARATOR = "\u001f";
  private static final String DICTIONARY = "seal-v1.zdict";
  private static final int PER_EPHEMERAL = 100_000;
  private static byte[] dictionary;

  /** One sealer per spec: every sealed column of a plan calls this one instance (Java
   * serialization keeps it shared within a task), so each column keeps its own key and state. */
  private transient Map<String, Sealer> sealers;

  @Override
  public String call(String rowId, String value, String spec) throws GeneralSecurityException {
    if (value == null) {
      return null;
    }
    if (sealers == null) {
      sealers = new HashMap<>();
    }
    Sealer sealer = sealers.get(spec);
    if (sealer == null) {
      sealer = new Sealer(spec);
      sealers.put(spec, sealer);
    }
    return sealer.seal(rowId, value);
  }

  private static final class Sealer {
    private final byte[] head;
    private final byte[] tail;
    private final byte[] recipient;
    private final Cipher aes;
    private final ZstdCompressCtx zstd;
    private final SecureRandom random = new SecureRandom();
    private final byte[] nonce = new byte[12];
    private byte[] lead;
    private SecretKeySpec key;
    private int sealed;

    Sealer(String spec) throws GeneralSecurityException {
      String[] parts = spec.split(SEPARATOR, -1);
      boolean compress = "1".equals(parts[1]);
      String keyId = parts[2];
      recipient = parts[5].isEmpty() ? null : Base64.getDecoder().decode(parts[5]);
      if (recipient == null) {
        key = new SecretKeySpec(DataKeys.unwrap(parts[3], parts[4].isEmpty() ? null : parts[4], keyId), "AES");
        lead = new byte[0];
      }
      String prefix = recipient == null ? "ek1" : "ek2";
      head = (prefix + (compress ? "z" : "") + ":" + keyId + ":").getBytes(StandardCharsets.UTF_8);
      tail = (SEPARATOR + parts[0]).getBytes(StandardCharsets.UTF_8);
      aes = Cipher.getInstance("AES/GCM/NoPadding");
      zstd = compress ? compressor() : null;
    }

    String seal(String rowId, String value) throws GeneralSecurityException {
      if (recipient != null && sealed++ % PER_EPHEMERAL == 0) {
        ephemeral();
      }
      byte[] plain = value.getBytes(StandardCharsets.UTF_8);
      if (zstd != null) {
        plain = zstd.compress(plain);
      }
      byte[] blob = new byte[lead.length + 12 + plain.length + 16];
      random.nextBytes(nonce);
      System.arraycopy(lead, 0, blob, 0, lead.length);
      System.arraycopy(nonce, 0, blob, lead.length, 12);
      aes.init(Cipher.ENCRYPT_MODE, key, new GCMParameterSpec(128, nonce));
      aes.updateAAD(rowId.getBytes(StandardCharsets.UTF_8));
      aes.updateAAD(tail);
      aes.doFinal(plain, 0, plain.length, blob, lead.length + 12);
      byte[] text = Base64.getEncoder().encode(blob);
      byte[] out = new byte[head.length + text.length];
      System.arraycopy(head, 0, out, 0, head.length);
      System.arraycopy(text, 0, out, head.length, text.length);
      return new String(out, StandardCharsets.US_ASCII);
    }

    /** A fresh ephemeral X25519 key agreed with the reveal public key: the AES key is HKDF-SHA256
     * of the shared secret (no salt, info "ehrlake ek2" | ephemeral | recipient), as Python derives it. */
    private void ephemeral() throws GeneralSecurityException {
      KeyPair pair = KeyPairGenerator.getInstance("X25519").generateKeyPair();
      lead = raw((XECPublicKey) pair.getPublic());
      KeyAgreement agreement = KeyAgreement.getInstance("X25519");
      agreement.init(pair.getPrivate());
      agreement.doPhase(publicKey(recipient), true);
      byte[] secret = agreement.generateSecret();
      Mac hmac = Mac.getInstance("HmacSHA256");
      hmac.init(new SecretKeySpec(new byte[32], "HmacSHA256"));
      byte[] pseudorandom = hmac.doFinal(secret);
      hmac.init(new SecretKeySpec(pseudorandom, "HmacSHA256"));
      hmac.update("ehrlake ek2".getBytes(StandardCharsets.US_ASCII));
      hmac.update(lead);
      hmac.update(recipient);
      hmac.update((byte) 1);
      key = new SecretKeySpec(hmac.doFinal(), "AES");
      Arrays.fill(secret, (byte) 0);
    }
  }

  /** RFC 7748's 32-byte little-endian encoding of an X25519 public key. */
  private static byte[] raw(XECPublicKey key) {
    byte[] bigEndian = key.getU().toByteArray();
    byte[] out = new byte[32];
    for (int i = 0; i < 32 && i < bigEndian.length; i++) {
      out[i] = bigEndian[bigEndian.length - 1 - i];
    }
    return out;
  }

  private static PublicKey publicKey(byte[] raw) throws GeneralSecurityException {
    byte[] bigEndian = new byte[32];
    for (int i = 0; i < 32; i++) {
      bigEndian[31 - i] = raw[i];
    }
    bigEndian[0] &= 0x7f; // the unused top bit (RFC 7748)
    return KeyFactory.getInstance("X25519")
        .generatePublic(new XECPublicKeySpec(NamedParameterSpec.X25519, new BigInteger(1, bigEndian)));
  }

  /** zstd level 1 with the shipped dictionary, the content size in the frame and no dictionary id,
   * as Python's compressor writes (its decompressor needs the size). */
  private static ZstdCompressCtx compressor() {
    ZstdCompressCtx ctx = new ZstdCompressCtx();
    ctx.setLevel(1);
    ctx.setContentSize(true);
    ctx.setDictID(false);
    ctx.loadDict(new ZstdDictCompress(dictionary(), 1));
    return ctx;
  }

  private static synchronized byte[] dictionary() {
    if (dictionary == null) {
      try (InputStream in = SealColumn.class.getResourceAsStream(DICTIONARY)) {
        if (in == null) {
          throw new IllegalStateException(DICTIONARY + " is not in ehrlake-spark.jar (rebuild: make setup)");
        }
        dictionary = in.readAllBytes();
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
    }
    return dictionary;
  }
}
