// The Terraform workspaces whose state Trellis keeps (GET /api/terraform/workspaces), each with
// its last apply, its state versions (GET /api/terraform/state/{ws}/versions) on demand, and
// Plan (a new plan from its last apply's configuration) and Destroy: a destroy plan with that
// configuration (terraform_plan {source_command_id, destroy: true}), reviewed on the plan page,
// where "Approve destroy" applies it once the workspace name is typed. Nothing is destroyed by
// the button itself.
import { Fragment, useState } from 'react';
import { useQuery, useQueryClient } from '@tanstack/react-query';
import { api, errorMessage } from '../lib/api';
import { terraformVersionsQuery, terraformWorkspacesQuery, useAgents, useCommands, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { destroyAgent, latestByWorkspace, planAgain } from '../lib/terraform';
import type { Command, TerraformWorkspace } from '../lib/types';
import { formatBytes } from '../lib/time';
import { Empty, ErrorBox, RelTime, Spinner, StatusPill, shortId } from '../components/ui';

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

export function TerraformWorkspaces() {
  const ws = useQuery(terraformWorkspacesQuery());
  const applies = useCommands({ type: 'terraform_apply', limit: 200 });
  const agents = useAgents();
  const qc = useQueryClient();
  const m = useMutations();
  const [open, setOpen] = useState<Set<string>>(new Set());
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
  // Destroy: a destroy plan with the configuration (and the variables, sensitive ones too, which
  // stay on the server) of the workspace's last apply — without one, of the command that wrote
  // its newest state version — on that command's agent if it can plan.
  const planDestroy = async (w: TerraformWorkspace) => {
    setBusy(`destroy:${w.workspace}`);
    setError(null);
    try {
      let source: Command | null = last.get(w.workspace) ?? null;
      if (!source) {
        const versions = await qc.fetchQuery(terraformVersionsQuery(w.workspace));
        const id = versions.find((v) => v.commandId)?.commandId;
        source = id ? await api.getCommand(id) : null;
      }
      if (!source) throw new Error(`No command of workspace ${w.workspace} is known any more: destroy it with the API or the CLI, giving its configuration.`);
      const agentId = destroyAgent(source.agentId, agents.data ?? []);
      if (!agentId) throw new Error('No agent can run terraform_plan: a destroy is planned before it is approved.');
      const id = await planAgain(m, source, agentId, true);
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
                            {(a.params as { destroy?: unknown } | null)?.destroy === true && <span className="muted small"> (destroy)</span>}
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
                          <button
                            type="button"
                            className="btn btn-sm btn-danger-ghost"
                            disabled={busy !== null}
                            title="Plan the destruction of every resource in this workspace, to review and approve"
                            onClick={() => void planDestroy(w)}
                            data-testid="workspace-destroy"
                          >
                            {busy === `destroy:${w.workspace}` ? 'Planning…' : 'Destroy'}
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
    </section>
  );
}
