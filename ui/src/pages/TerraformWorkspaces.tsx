// The Terraform workspaces whose state Trellis keeps (GET /api/terraform/workspaces), each with
// its last apply, its state versions (GET /api/terraform/state/{ws}/versions) on demand, and
// Plan (a new plan from its last apply's configuration) and Destroy (a terraform_destroy with
// that configuration, confirmed by typing the workspace name).
import { Fragment, useState, type FormEvent } from 'react';
import { useQuery } from '@tanstack/react-query';
import { errorMessage } from '../lib/api';
import { terraformVersionsQuery, terraformWorkspacesQuery, useAgents, useCommands, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { UI_META, latestByWorkspace, planAgain, workspaceConfirmed } from '../lib/terraform';
import type { Command, TerraformWorkspace } from '../lib/types';
import { formatBytes } from '../lib/time';
import { Modal } from '../components/Modal';
import { Empty, ErrorBox, Field, Notice, RelTime, Spinner, StatusPill, shortId } from '../components/ui';

function CommandLink({ id }: { id: string | null | undefined }) {
  if (!id) return <>–</>;
  return (
    <a href={`#/commands/${encodeURIComponent(id)}`} className="mono">
      {shortId(id)}
    </a>
  );
}

/** The stored versions of one workspace's state, newest first. */
function VersionsTable({ workspace, id }: { workspace: string; id: string }) {
  const q = useQuery(terraformVersionsQuery(workspace));
  if (q.isPending) return <Spinner label="Loading the state versions" />;
  if (q.error) return <ErrorBox title="Cannot load the state versions">{errorMessage(q.error)}</ErrorBox>;
  return (
    <table className="table table-compact" id={id} data-testid="state-versions">
      <caption className="sr-only">State versions of {workspace}</caption>
      <thead>
        <tr>
          <th scope="col">Version</th>
          <th scope="col">Serial</th>
          <th scope="col">Written by</th>
          <th scope="col">Size</th>
          <th scope="col">Stored</th>
        </tr>
      </thead>
      <tbody>
        {q.data.map((v) => (
          <tr key={v.version} data-version={v.version}>
            <td>{v.version}</td>
            <td>{v.serial ?? '–'}</td>
            <td>
              <CommandLink id={v.commandId} />
            </td>
            <td>{formatBytes(v.sizeBytes)}</td>
            <td>
              <RelTime ts={v.createdAt} />
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/**
 * Destroy: every resource in the workspace's state, with the configuration (and the variables,
 * sensitive ones too, which stay on the server) of `source`, on a chosen agent.
 */
function DestroyWorkspaceDialog({ workspace, source, onClose }: { workspace: TerraformWorkspace; source: Command | null; onClose: () => void }) {
  const agents = useAgents();
  const m = useMutations();
  // Without a known last apply, the command that wrote the newest state version.
  const versions = useQuery(terraformVersionsQuery(workspace.workspace, !source));
  const sourceId = source?.id ?? versions.data?.find((v) => v.commandId)?.commandId ?? null;
  const capable = (agents.data ?? []).filter((a) => a.capabilities.includes('terraform_destroy'));
  const [agentId, setAgentId] = useState('');
  const chosen = agentId || (source && capable.some((a) => a.id === source.agentId) ? source.agentId : capable.length === 1 ? capable[0].id : '');
  const [typed, setTyped] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const ok = workspaceConfirmed(typed, workspace.workspace) && !!chosen && !!sourceId;

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!ok || busy || !sourceId) return;
    setBusy(true);
    setError(null);
    try {
      const r = await m.createCommand({
        agentId: chosen,
        type: 'terraform_destroy',
        params: { source_command_id: sourceId, meta: { ...UI_META, reason: 'destroy from the Deploy page' } },
      });
      onClose();
      navigate(`/deploy?destroy=${encodeURIComponent(r.commandId)}`);
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <Modal
      title="Destroy this workspace's resources?"
      onClose={onClose}
      testId="workspace-destroy-dialog"
      wide
      footer={
        <>
          <button type="button" className="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" form="workspace-destroy-form" className="btn btn-danger" disabled={!ok || busy} data-testid="workspace-destroy-submit">
            {busy ? 'Starting…' : 'Destroy resources'}
          </button>
        </>
      }
    >
      <form id="workspace-destroy-form" onSubmit={submit} noValidate>
        <p>
          <code>terraform destroy</code> runs for workspace <strong className="mono">{workspace.workspace}</strong>: <strong>every resource in its state</strong> (state version{' '}
          {workspace.latestVersion}) is destroyed and removed from it. This cannot be undone.
        </p>
        {sourceId ? (
          <p className="muted">
            It uses the configuration and variables of command <CommandLink id={sourceId} />
            {source?.target?.version && (
              <>
                {' '}
                (version <span className="mono">{source.target.version}</span>)
              </>
            )}
            ; sensitive values are taken from Trellis's encrypted store, never from this page.
          </p>
        ) : versions.isPending ? (
          <Spinner label="Finding the workspace's last command" />
        ) : (
          <Notice tone="warn">No command of this workspace is known any more: destroy it with the API or the CLI, giving its configuration.</Notice>
        )}
        {workspace.lockedBy && (
          <Notice tone="warn">
            Command <CommandLink id={workspace.lockedBy} /> holds the workspace's lock: the destroy waits until it is released.
          </Notice>
        )}
        <Field label="Agent that runs terraform destroy" error={capable.length === 0 ? 'No agent can run terraform_destroy.' : null}>
          {(p) => (
            <select {...p} value={chosen} onChange={(e) => setAgentId(e.target.value)} data-testid="workspace-destroy-agent">
              <option value="">Choose…</option>
              {capable.map((a) => (
                <option key={a.id} value={a.id}>
                  {a.name} — {a.status}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field
          label="Type the workspace name to confirm"
          hint={workspace.workspace}
          error={typed.trim() && !workspaceConfirmed(typed, workspace.workspace) ? 'The name does not match.' : null}
        >
          {(p) => (
            <input
              {...p}
              value={typed}
              onChange={(e) => setTyped(e.target.value)}
              autoComplete="off"
              spellCheck={false}
              className="mono"
              data-autofocus
              data-testid="workspace-destroy-confirm"
            />
          )}
        </Field>
        {error && <ErrorBox title="Could not start the destroy">{error}</ErrorBox>}
      </form>
    </Modal>
  );
}

export function TerraformWorkspaces() {
  const ws = useQuery(terraformWorkspacesQuery());
  const applies = useCommands({ type: 'terraform_apply', limit: 200 });
  const m = useMutations();
  const [open, setOpen] = useState<Set<string>>(new Set());
  const [destroying, setDestroying] = useState<TerraformWorkspace | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState<string | null>(null);
  const last = latestByWorkspace(applies.data ?? []);

  const toggle = (name: string) =>
    setOpen((s) => {
      const n = new Set(s);
      if (n.has(name)) n.delete(name);
      else n.add(name);
      return n;
    });
  const replan = async (source: Command) => {
    setBusy(source.id);
    setError(null);
    try {
      const id = await planAgain(m, source);
      navigate(`/deploy?plan=${encodeURIComponent(id)}`);
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(null);
    }
  };

  return (
    <section className="card" aria-labelledby="workspaces-heading" data-testid="workspaces">
      <h2 id="workspaces-heading">Workspaces</h2>
      <p className="muted small">Terraform state Trellis keeps, one workspace per configuration (its workspace key, else the repository and path).</p>
      {error && <ErrorBox>{error}</ErrorBox>}
      {ws.error && <ErrorBox title="Cannot load the workspaces">{errorMessage(ws.error)}</ErrorBox>}
      {ws.isPending ? (
        <Spinner label="Loading the workspaces" />
      ) : (ws.data ?? []).length === 0 ? (
        <Empty>No state stored yet: it appears here after the first apply.</Empty>
      ) : (
        <div className="table-wrap">
          <table className="table">
            <thead>
              <tr>
                <th scope="col">Workspace</th>
                <th scope="col">State</th>
                <th scope="col">Last apply</th>
                <th scope="col">
                  <span className="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {(ws.data ?? []).map((w) => {
                const a = last.get(w.workspace) ?? null;
                const expanded = open.has(w.workspace);
                const versionsId = `versions-${w.workspace.replace(/[^A-Za-z0-9_-]/g, '_')}`;
                return (
                  <Fragment key={w.workspace}>
                    <tr data-testid="workspace-row" data-workspace={w.workspace}>
                      <td className="mono">{w.workspace}</td>
                      <td>
                        <span data-testid="workspace-version">version {w.latestVersion}</span> <span className="muted small">({w.versions} kept)</span>
                        <div className="muted small">
                          updated <RelTime ts={w.updatedAt} />
                        </div>
                        {w.lockedBy && (
                          <div className="small">
                            <StatusPill status="running" label="locked" /> by <CommandLink id={w.lockedBy} />
                          </div>
                        )}
                      </td>
                      <td data-testid="workspace-last-apply">
                        {a ? (
                          <>
                            <StatusPill status={a.status} /> <CommandLink id={a.id} />
                            <div className="muted small">
                              <RelTime ts={a.finishedAt ?? a.createdAt} />
                              {a.target?.version ? ` · ${a.target.version}` : ''}
                              {a.createdBy ? ` · by ${a.createdBy}` : ''}
                            </div>
                          </>
                        ) : (
                          <span className="muted">none recent</span>
                        )}
                      </td>
                      <td className="row-actions">
                        <div className="btn-row">
                          <button type="button" className="btn btn-sm" aria-expanded={expanded} aria-controls={versionsId} onClick={() => toggle(w.workspace)} data-testid="workspace-versions-toggle">
                            {expanded ? 'Hide versions' : 'Versions'}
                          </button>
                          <button
                            type="button"
                            className="btn btn-sm"
                            disabled={!a || busy !== null}
                            title={a ? 'Plan again with the last apply’s configuration' : 'No recent apply to take the configuration from'}
                            onClick={() => a && void replan(a)}
                            data-testid="workspace-plan"
                          >
                            {busy && busy === a?.id ? 'Planning…' : 'Plan'}
                          </button>
                          <button type="button" className="btn btn-sm btn-danger-ghost" onClick={() => setDestroying(w)} data-testid="workspace-destroy">
                            Destroy
                          </button>
                        </div>
                      </td>
                    </tr>
                    {expanded && (
                      <tr className="detail-row">
                        <td colSpan={4}>
                          <VersionsTable workspace={w.workspace} id={versionsId} />
                        </td>
                      </tr>
                    )}
                  </Fragment>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {destroying && <DestroyWorkspaceDialog workspace={destroying} source={last.get(destroying.workspace) ?? null} onClose={() => setDestroying(null)} />}
    </section>
  );
}
