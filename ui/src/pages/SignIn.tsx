import { useState, type FormEvent } from 'react';
import { ApiError, api } from '../lib/api';
import { Field } from '../components/ui';

export function SignIn({ onSignedIn, expired }: { onSignedIn: (name: string) => void; expired: boolean }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState<string | null>(expired ? 'Your session ended (signed out, expired or revoked). Sign in again.' : null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) {
      setError('Enter the admin token.');
      return;
    }
    setBusy(true);
    setError(null);
    try {
      // The server sets an HttpOnly session cookie; this page forgets the token.
      const s = await api.signIn(t);
      setToken('');
      onSignedIn(s.name);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        setError('That admin token was rejected (401). Check TRELLIS_ADMIN_TOKEN on the server, or the token printed at first start.');
      } else if (err instanceof ApiError && err.status === 429) {
        setError('Too many failed sign-ins from this address. Wait a minute and try again.');
      } else if (err instanceof ApiError && err.status === 0) {
        setError('Cannot reach the Trellis server. Is `trellis serve` running?');
      } else if (err instanceof ApiError) {
        setError(`The server answered ${err.status}: ${err.message}`);
      } else {
        setError(String(err));
      }
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="signin">
      <form className="signin-card" onSubmit={submit} noValidate data-testid="signin-form">
        <div className="brand brand-dark">
          <span className="brand-mark" aria-hidden="true">T</span>
          <span className="brand-name">Trellis</span>
        </div>
        <h1>Sign in</h1>
        <p className="muted">
          Use an admin token of this control plane (the bootstrap token, or one from <code>trellis admins create</code>). It
          is exchanged for a session cookie valid for 12 hours; the page does not keep the token.
        </p>
        <Field label="Admin token" error={error}>
          {(p) => (
            <input
              {...p}
              type="password"
              name="token"
              autoComplete="current-password"
              autoFocus
              value={token}
              onChange={(e) => setToken(e.target.value)}
              data-testid="token-input"
            />
          )}
        </Field>
        <button type="submit" className="btn btn-primary btn-block" disabled={busy} data-testid="signin-submit">
          {busy ? 'Checking…' : 'Sign in'}
        </button>
      </form>
    </div>
  );
}
