import { useEffect, useState } from 'react';
import { useQueryClient } from '@tanstack/react-query';
import { api, onUnauthorized } from './lib/api';
import { match, navigate, useRoute } from './lib/router';
import { SignIn } from './pages/SignIn';
import { Hypervisors } from './pages/Hypervisors';
import { Templates } from './pages/Templates';
import { Nodes } from './pages/Nodes';
import { Commands } from './pages/Commands';
import { CommandPage } from './pages/CommandPage';
import { CommandLog } from './pages/CommandLog';
import { Deploy } from './pages/Deploy';
import { Audit } from './pages/Audit';

const NAV = [
  { path: '/hypervisors', label: 'Hypervisors', icon: '▣' },
  { path: '/nodes', label: 'Nodes', icon: '◫' },
  { path: '/templates', label: 'Templates', icon: '❏' },
  { path: '/commands', label: 'Commands', icon: '≡' },
  { path: '/deploy', label: 'Deploy', icon: '⇪' },
  { path: '/audit', label: 'Audit', icon: '☰' },
];

export function App() {
  // Who is signed in (the session cookie); undefined while asking the server.
  const [who, setWho] = useState<string | null | undefined>(undefined);
  const [expired, setExpired] = useState(false);
  const route = useRoute();
  const queryClient = useQueryClient();

  useEffect(() => {
    let alive = true;
    api.session().then(
      (s) => alive && setWho(s.name),
      () => alive && setWho(null),
    );
    return () => {
      alive = false;
    };
  }, []);

  useEffect(
    () =>
      onUnauthorized(() => {
        setWho(null);
        setExpired(true);
        // Nothing read with the old token survives into the next session.
        queryClient.clear();
      }),
    [queryClient],
  );

  if (who === undefined) return <div className="signin" aria-busy="true" />;
  if (!who) {
    return (
      <SignIn
        expired={expired}
        onSignedIn={(name) => {
          setWho(name);
          setExpired(false);
          // Stay on the page the user asked for (e.g. a shared #/commands/<id> link).
          const current = window.location.hash.replace(/^#/, '');
          if (current === '' || current === '/') navigate('/hypervisors', { replace: true });
        }}
      />
    );
  }

  const signOut = () => {
    void api.signOut().finally(() => {
      setWho(null);
      setExpired(false);
      queryClient.clear();
    });
  };

  // A command's log on its own (opened in a new window from the command page): no shell.
  const logOnly = match('/commands/:id/log', route.path);
  if (logOnly) return <CommandLog id={logOnly.id} />;

  let page;
  let params: Record<string, string> | null;
  const p = route.path;
  if (p === '/' || p === '') page = <Hypervisors />;
  else if (p === '/hypervisors') page = <Hypervisors />;
  else if (p === '/templates') page = <Templates />;
  else if (p === '/nodes') page = <Nodes query={route.query} />;
  else if (p === '/commands') page = <Commands query={route.query} />;
  else if ((params = match('/commands/:id', p))) page = <CommandPage id={params.id} />;
  else if (p === '/deploy') page = <Deploy query={route.query} />;
  else if (p === '/audit') page = <Audit query={route.query} />;
  else
    page = (
      <div className="page">
        <h1>Not found</h1>
        <p>
          No page at <code>{p}</code>. <a href="#/hypervisors">Go to hypervisors</a>.
        </p>
      </div>
    );

  const active = NAV.find((n) => p === n.path || p.startsWith(`${n.path}/`))?.path ?? (p === '/' ? '/hypervisors' : null);

  return (
    <div className="shell">
      <a className="skip-link" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>
        Skip to content
      </a>
      <aside className="sidebar">
        <div className="brand">
          <span className="brand-mark" aria-hidden="true">T</span>
          <span className="brand-name">Trellis</span>
        </div>
        <nav aria-label="Main">
          <ul>
            {NAV.map((n) => (
              <li key={n.path}>
                <a href={`#${n.path}`} className={active === n.path ? 'active' : ''} aria-current={active === n.path ? 'page' : undefined}>
                  <span className="nav-icon" aria-hidden="true">
                    {n.icon}
                  </span>
                  {n.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <div className="sidebar-foot">
          <p className="signed-in" data-testid="signed-in-as">
            Signed in as <strong>{who}</strong>
          </p>
          <button type="button" className="btn btn-ghost btn-sm" onClick={signOut} data-testid="sign-out">
            Sign out
          </button>
        </div>
      </aside>
      <main id="main" tabIndex={-1}>
        {page}
      </main>
    </div>
  );
}
