/**
 * `https://user:token@host/repo.git` → `https://host/repo.git`: what the browser may keep
 * of a URL (never its credentials). Strings without `scheme://userinfo@` are returned as is.
 */
export function stripUrlCredentials(s: string): string {
  return s.replace(/([a-zA-Z][a-zA-Z0-9+.-]*:\/\/)([^/?#\s@]*@)+/g, '$1');
}
