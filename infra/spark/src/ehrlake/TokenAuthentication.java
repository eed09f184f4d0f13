package ehrlake;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;

import javax.security.sasl.AuthenticationException;

import org.apache.hive.service.auth.PasswdAuthenticationProvider;

/**
 * The JDBC endpoint's login ({@code hive.server2.authentication=CUSTOM}): the password must be the
 * server's bearer token, which {@code ehrlake serve sql} writes to a file only its user can read.
 * The user name is only recorded.
 */
public final class TokenAuthentication implements PasswdAuthenticationProvider {
  private static volatile byte[] token = null;

  /** The token clients must give from now on (none: nobody logs in). */
  public static void expect(String expected) {
    token = expected == null ? null : expected.getBytes(StandardCharsets.UTF_8);
  }

  @Override
  public void Authenticate(String user, String password) throws AuthenticationException {
    byte[] expected = token;
    byte[] given = password == null ? new byte[0] : password.getBytes(StandardCharsets.UTF_8);
    if (expected == null || !MessageDigest.isEqual(expected, given)) {
      throw new AuthenticationException("ehrlake: wrong token for the SQL server");
    }
  }
}
