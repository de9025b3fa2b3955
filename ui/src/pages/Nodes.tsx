import { useMemo, useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useAgents, useCommandsById, useMutations, useNodes, useTemplates } from '../lib/queries';
import { navigate, setQuery } from '../lib/router';
import { NODE_STATUS_LABEL, type Command, type PowerAction, type VmNode } from '../lib/types';
import { formatMemory } from '../lib/time';
import { validateCores, validateMemory, validateVmName } from '../lib/validation';
import { ConfirmDialog, Modal } from '../components/Modal';
import { Empty, ErrorBox, Field, NodeStatusPill, RelTime, Spinner, copyText } from '../components/ui';
import { Menu, type MenuItem } from '../components/Menu';
import { ProvisionModal } from './provision/ProvisionModal';
import { DestroyDialog, ForgetDialog } from './NodeLifecycleDialogs';
import { BulkActionBar, SelectAll } from './BulkActions';
import { nodeProgressText, nodesMatching, selectedShown } from '../lib/bulk';
import { POWER_ACTIONS, POWER_LABEL, POWER_VERB, actionAvailability, commandActivity, hasLiveVm, nodeBusy, nodeSizeText, sshCommand, type NodeAction } from './nodeActions';

function NodeDialog({ node, onClose }: { node: VmNode | null; onClose: () => void }) {
  const templates = useTemplates();
  const m = useMutations();
  const provisioned = node?.vmId != null;
  const [f, setF] = useState({
    name: node?.name ?? '',
    application: node?.application ?? '',
    templateId: node?.templateId ?? '',
    // An imported node's size is unknown (0): shown empty, not as 0.
    memory: node && node.memory > 0 ? String(node.memory) : '',
    cores: node && node.cores > 0 ? String(node.cores) : '',
  });
  const [touched, setTouched] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const tpl = templates.data?.find((t) => t.id === f.templateId);
  const errs = {
    name: provisioned ? null : validateVmName(f.name),
    // A provisioned node's template is history (an imported one has none): only the application is edited.
    templateId: f.templateId || provisioned ? null : 'Choose a template.',
    memory: provisioned || (f.memory === '' && !node) ? null : validateMemory(f.memory),
    cores: provisioned || (f.cores === '' && !node) ? null : validateCores(f.cores),
  };
  const set = (k: keyof typeof f) => (e: { target: { value: string } }) => setF({ ...f, [k]: e.target.value });
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched(true);
    if (Object.values(errs).some(Boolean)) return;
    setBusy(true);
    setError(null);
    try {
      const memory = f.memory ? Number(f.memory) : tpl?.memory;
      const cores = f.cores ? Number(f.cores) : tpl?.cores;
      if (node) {
        await m.updateNode(node.id, provisioned ? { application: f.application.trim() || null } : {
          name: f.name.trim(),
          application: f.application.trim() || null,
          templateId: f.templateId,
          memory,
          cores,
        });
      } else {
        await m.createNode({ name: f.name.trim(), application: f.application.trim() || null, templateId: f.templateId, memory, cores });
      }
      onClose();
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };
  const show = (k: keyof typeof errs) => (touched ? errs[k] : null);
  return (
    <Modal
      title={node ? `Edit ${node.name}` : 'New node'}
      onClose={onClose}
      testId="node-dialog"
      footer={
        <>
          <button type="button" className="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" form="node-form" className="btn btn-primary" disabled={busy} data-testid="node-save">
            {busy ? 'Saving…' : node ? 'Save' : 'Create node'}
          </button>
        </>
      }
    >
      <form id="node-form" onSubmit={submit} noValidate>
        {provisioned && <p className="muted small">This node is provisioned; only its application can change here.</p>}
        <Field label="Name" error={show('name')} hint="A DNS name: letters, digits, hyphens">
          {(p) => <input {...p} value={f.name} onChange={set('name')} disabled={provisioned} data-autofocus data-testid="node-name" />}
        </Field>
        <Field label="Application (optional)">
          {(p) => <input {...p} value={f.application} onChange={set('application')} data-testid="node-application" />}
        </Field>
        <Field label="Template" error={show('templateId')}>
          {(p) => (
            <select {...p} value={f.templateId} onChange={set('templateId')} disabled={provisioned} data-testid="node-template">
              <option value="">Choose…</option>
              {(templates.data ?? []).map((t) => (
                <option key={t.id} value={t.id}>
                  {t.name}
                  {t.proxmoxTemplateId == null ? ' (not mapped)' : ''}
                </option>
              ))}
            </select>
          )}
        </Field>
        <div className="grid2">
          <Field label="Memory (MiB)" error={show('memory')} hint={tpl && !node ? `Template default ${tpl.memory}` : '16 – 4194304'}>
            {(p) => <input {...p} inputMode="numeric" value={f.memory} onChange={set('memory')} disabled={provisioned} placeholder={provisioned && !f.memory ? 'unknown' : tpl ? String(tpl.memory) : ''} />}
          </Field>
          <Field label="Cores" error={show('cores')} hint={tpl && !node ? `Template default ${tpl.cores}` : '1 – 512'}>
            {(p) => <input {...p} inputMode="numeric" value={f.cores} onChange={set('cores')} disabled={provisioned} placeholder={provisioned && !f.cores ? 'unknown' : tpl ? String(tpl.cores) : ''} />}
          </Field>
        </div>
        {error && <ErrorBox title="Could not save">{error}</ErrorBox>}
      </form>
    </Modal>
  );
}

/** What runs on a node: the Progress button (provision wizard) or a link to the command page. */
function NodeActivity({ node, cmd, onOpenWizard }: { node: VmNode; cmd: Command | undefined; onOpenWizard: () => void }) {
  if (node.status === 'provisioning') {
    return (
      <button type="button" className="btn btn-sm btn-primary" onClick={onOpenWizard} data-testid="node-progress">
        Progress
      </button>
    );
  }
  const activity = commandActivity(cmd, node.status);
  const pct = cmd?.percent;
  return (
    <a
      className="btn btn-sm btn-busy"
      href={`#/commands/${encodeURIComponent(node.lastCommandId ?? '')}`}
      data-testid="node-command"
      title="Open the command that is changing this node"
    >
      <span className="spinner spinner-sm" aria-hidden="true" />
      {activity}…{pct != null && pct > 0 ? ` ${Math.round(pct)}%` : ''}
    </a>
  );
}

export function Nodes({ query }: { query: URLSearchParams }) {
  const nodes = useNodes();
  const agents = useAgents();
  const templates = useTemplates();
  const m = useMutations();
  const [editing, setEditing] = useState<VmNode | null | 'new'>(null);
  const [deleting, setDeleting] = useState<VmNode | null>(null);
  const [destroying, setDestroying] = useState<VmNode | null>(null);
  const [forgetting, setForgetting] = useState<VmNode | null>(null);
  const [delBusy, setDelBusy] = useState(false);
  const [delErr, setDelErr] = useState<string | null>(null);
  const [actionErr, setActionErr] = useState<string | null>(null);
  const [pending, setPending] = useState<Record<string, PowerAction>>({});
  // Commands this page started: busy from the answer on, before their status is first read.
  const [started, setStarted] = useState<ReadonlySet<string>>(() => new Set());
  // ?q= (e.g. a command page's link to its node) starts the list filtered.
  const [filter, setFilter] = useState(() => query.get('q') ?? '');
  // Multi-select for bulk actions (ids; a node that disappears drops out).
  const [selected, setSelected] = useState<ReadonlySet<string>>(() => new Set());

  // The open provision wizard lives in the URL (?provision=<nodeId> or ?provision=new), so a
  // reload reopens it on the live command.
  const provisionParam = query.get('provision');
  // A node created by the open "new" wizard keeps that same wizard instance.
  const [createdId, setCreatedId] = useState<string | null>(null);
  const wizardNew = provisionParam === 'new' || (provisionParam !== null && provisionParam === createdId);
  const items = useMemo(() => nodes.data ?? [], [nodes.data]);
  // The last command of every node with one: whether it still runs decides "busy".
  const lastCommands = useCommandsById(items.flatMap((n) => (n.lastCommandId ? [n.lastCommandId] : [])));
  const provisionNode = provisionParam && provisionParam !== 'new' ? items.find((n) => n.id === provisionParam) : undefined;
  const agentName = (id: string | null | undefined) => (id ? (agents.data?.find((a) => a.id === id)?.name ?? id.slice(0, 8)) : '–');
  const templateName = (id: string | null | undefined) => templates.data?.find((t) => t.id === id)?.name ?? '–';

  const shown = nodesMatching(items, filter);
  // Bulk actions act on the selected nodes the filter shows, never on hidden ones.
  const selectedNodes = selectedShown(shown, selected);
  const toggle = (id: string) =>
    setSelected((prev) => {
      const next = new Set(prev);
      if (next.has(id)) next.delete(id);
      else next.add(id);
      return next;
    });

  const openProvision = (id: string) => setQuery('/nodes', { provision: id });
  const closeProvision = () => {
    setCreatedId(null);
    setQuery('/nodes', {});
    void nodes.refetch();
  };

  const power = async (n: VmNode, action: PowerAction) => {
    setActionErr(null);
    setPending((p) => ({ ...p, [n.id]: action }));
    try {
      const r = await m.powerNode(n.id, { action });
      const id = r.commandId;
      if (id) setStarted((prev) => new Set(prev).add(id));
    } catch (e) {
      setActionErr(`Could not ${POWER_VERB[action]} ${n.name}: ${errorMessage(e)}`);
    } finally {
      setPending((p) => {
        const { [n.id]: _done, ...rest } = p;
        void _done;
        return rest;
      });
    }
  };

  return (
    <div className="page">
      <header className="page-head">
        <div>
          <h1>Nodes</h1>
          <p className="muted">VMs Trellis tracks. Their state follows what the hypervisor reports.</p>
        </div>
        <div className="btn-row">
          <button type="button" className="btn" onClick={() => setEditing('new')} data-testid="new-node">
            New node
          </button>
          <button type="button" className="btn btn-primary" onClick={() => openProvision('new')} data-testid="provision-new">
            Provision new VM
          </button>
        </div>
      </header>
      <div className="toolbar">
        <input
          type="search"
          className="search"
          placeholder="Filter by name, application, IP, status…"
          aria-label="Filter nodes"
          value={filter}
          onChange={(e) => setFilter(e.target.value)}
        />
        <span className="muted small">
          {shown.length} of {items.length}
        </span>
      </div>
      {nodes.error && <ErrorBox title="Could not load nodes">{errorMessage(nodes.error)}</ErrorBox>}
      {actionErr && (
        <div className="errorbox errorbox-dismiss" role="alert" data-testid="node-action-error">
          <div>{actionErr}</div>
          <button type="button" className="btn btn-sm" onClick={() => setActionErr(null)}>
            Dismiss
          </button>
        </div>
      )}
      {selectedNodes.length > 0 && <BulkActionBar nodes={selectedNodes} onClear={() => setSelected(new Set())} />}
      {nodes.isPending ? (
        <Spinner />
      ) : items.length === 0 ? (
        <Empty>No nodes yet. Create one, or provision a new VM directly.</Empty>
      ) : (
        <div className="table-wrap">
          <table className="table table-stack" data-testid="nodes-table">
            <thead>
              <tr>
                <th className="select-col">
                  <SelectAll shown={shown.map((n) => n.id)} selected={selected} onChange={setSelected} />
                </th>
                <th>Name</th>
                <th className="hide-lg">Application</th>
                <th className="hide-md">Template / size</th>
                <th>Status</th>
                <th className="hide-md">Hypervisor</th>
                <th>IP</th>
                <th className="hide-sm">VM id</th>
                <th className="actions-col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {shown.map((n) => {
                const cmd = n.lastCommandId ? lastCommands.get(n.lastCommandId) : undefined;
                // A command just started here whose status is not read yet counts as queued.
                const cmdStatus = cmd?.status ?? (n.lastCommandId && started.has(n.lastCommandId) ? 'queued' : undefined);
                const busy = nodeBusy(n, cmdStatus) || n.id in pending;
                const avail = (a: NodeAction) => {
                  const r = actionAvailability(n, a, cmdStatus);
                  return n.id in pending && r.offered ? { offered: true, reason: 'A request is on its way' } : r;
                };
                const live = hasLiveVm(n);
                const noVmReason = n.vmId == null ? 'Not provisioned yet' : live ? 'No IP address reported' : `The VM is ${NODE_STATUS_LABEL[n.status]}`;
                const lifecycle: MenuItem[] = [];
                for (const a of POWER_ACTIONS) {
                  const r = avail(a);
                  if (r.offered) lifecycle.push({ label: POWER_LABEL[a], disabled: !!r.reason, reason: r.reason ?? undefined, onSelect: () => void power(n, a) });
                }
                const destroy = avail('destroy');
                if (destroy.offered)
                  lifecycle.push({ label: 'Destroy…', danger: true, disabled: !!destroy.reason, reason: destroy.reason ?? undefined, onSelect: () => setDestroying(n) });
                const forget = avail('forget');
                if (forget.offered)
                  lifecycle.push({ label: 'Forget…', disabled: !!forget.reason, reason: forget.reason ?? undefined, onSelect: () => setForgetting(n) });
                const del = avail('delete');
                if (del.offered)
                  lifecycle.push({
                    label: 'Delete',
                    danger: true,
                    disabled: !!del.reason,
                    reason: del.reason ?? undefined,
                    onSelect: () => {
                      setDelErr(null);
                      setDeleting(n);
                    },
                  });
                const prov = avail('provision');
                return (
                  <tr key={n.id} data-node-name={n.name} data-node-id={n.id} data-status={n.status} data-busy={busy || undefined}>
                    <td className="select-col">
                      <input type="checkbox" aria-label={`Select ${n.name}`} checked={selected.has(n.id)} onChange={() => toggle(n.id)} data-testid="node-select" />
                    </td>
                    <td data-label="Name" className="cell-title">
                      <strong className="nowrap">{n.name}</strong>
                      {n.application && <div className="small muted show-lg">{n.application}</div>}
                      {n.error && (
                        <div className={`small clamp ${n.status === 'running' || n.status === 'stopped' ? 'warn-text' : 'err-text'}`} title={n.error} data-testid="node-error">
                          {n.error.length > 80 ? `${n.error.slice(0, 80)}…` : n.error}
                        </div>
                      )}
                    </td>
                    <td data-label="Application" className="hide-lg">{n.application ?? '–'}</td>
                    <td data-label="Template" className="hide-md nowrap">
                      {templateName(n.templateId)}
                      <div
                        className="small muted"
                        data-col="size"
                        title={n.memory > 0 && n.cores > 0 ? undefined : 'Imported VM: memory and cores are not known to Trellis'}
                      >
                        {nodeSizeText(n, formatMemory)}
                      </div>
                    </td>
                    <td data-label="Status">
                      <NodeStatusPill status={n.status} title={n.error ?? undefined} />
                      {nodeProgressText(n) && (
                        <div className="small muted nowrap" data-col="progress">
                          {nodeProgressText(n)}
                        </div>
                      )}
                      {n.vmId != null && (
                        <div className="small muted nowrap" data-col="seen">
                          {n.observedAt ? (
                            <>
                              last seen <RelTime ts={n.observedAt} />
                            </>
                          ) : (
                            'not seen yet'
                          )}
                        </div>
                      )}
                    </td>
                    <td data-label="Hypervisor" className="hide-md nowrap">
                      {agentName(n.hypervisorId)}
                      {n.vmNode && (
                        <div className="small muted" data-col="vm-node">
                          node {n.vmNode}
                        </div>
                      )}
                    </td>
                    <td data-label="IP" className="mono" data-col="ip">
                      {n.ipAddress ?? '–'}
                    </td>
                    <td data-label="VM id" className="hide-sm" data-col="vmid">
                      {n.vmId ?? '–'}
                    </td>
                    <td className="actions-col">
                      <div className="row-actions">
                        {busy && !(n.id in pending) ? (
                          <NodeActivity node={n} cmd={cmd} onOpenWizard={() => openProvision(n.id)} />
                        ) : prov.offered ? (
                          <button type="button" className="btn btn-sm btn-primary" onClick={() => openProvision(n.id)} data-testid="node-provision">
                            {n.status === 'failed' ? 'Retry…' : 'Provision'}
                          </button>
                        ) : n.status === 'stopped' && !busy ? (
                          <button type="button" className="btn btn-sm" onClick={() => void power(n, 'start')} data-testid="node-start">
                            Start
                          </button>
                        ) : null}
                        <button
                          type="button"
                          className="btn btn-sm"
                          disabled={!n.lastCommandId}
                          title={n.lastCommandId ? 'Open the last command of this node' : 'No command has run for this node'}
                          onClick={() => n.lastCommandId && navigate(`/commands/${n.lastCommandId}`)}
                        >
                          Log
                        </button>
                        <Menu
                          label={`More actions for ${n.name}`}
                          items={[
                            ...lifecycle,
                            {
                              label: 'Copy SSH command',
                              disabled: !n.ipAddress || !live,
                              reason: noVmReason,
                              onSelect: () => void copyText(sshCommand(n, templates.data ?? [], cmd)),
                            },
                            {
                              label: 'Copy IP address',
                              disabled: !n.ipAddress || !live,
                              reason: noVmReason,
                              onSelect: () => void copyText(n.ipAddress ?? ''),
                            },
                            {
                              label: 'Hypervisor commands',
                              disabled: !n.hypervisorId,
                              reason: 'Not provisioned yet',
                              onSelect: () => navigate(`/commands?agentId=${encodeURIComponent(n.hypervisorId ?? '')}`),
                            },
                            { label: 'Edit', disabled: busy, reason: 'Wait for the running command to finish', onSelect: () => setEditing(n) },
                          ]}
                        />
                      </div>
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {editing && <NodeDialog node={editing === 'new' ? null : editing} onClose={() => setEditing(null)} />}
      {wizardNew && (
        <ProvisionModal
          key="new"
          node={null}
          onClose={closeProvision}
          onNodeCreated={(nd) => {
            setCreatedId(nd.id);
            window.history.replaceState(null, '', `#/nodes?provision=${encodeURIComponent(nd.id)}`);
          }}
        />
      )}
      {!wizardNew && provisionNode && <ProvisionModal key={provisionNode.id} node={provisionNode} onClose={closeProvision} />}
      {!wizardNew && provisionParam && !provisionNode && nodes.data && (
        <Modal title="Node not found" onClose={closeProvision}>
          <p>The node to provision no longer exists.</p>
        </Modal>
      )}
      {destroying && <DestroyDialog node={destroying} onClose={() => setDestroying(null)} />}
      {forgetting && <ForgetDialog node={forgetting} onClose={() => setForgetting(null)} />}
      {deleting && (
        <ConfirmDialog
          title={`Delete node ${deleting.name}?`}
          confirmLabel="Delete node"
          danger
          busy={delBusy}
          error={delErr}
          onCancel={() => setDeleting(null)}
          onConfirm={async () => {
            setDelBusy(true);
            try {
              await m.deleteNode(deleting.id);
              setDeleting(null);
            } catch (e) {
              setDelErr(errorMessage(e));
            } finally {
              setDelBusy(false);
            }
          }}
        >
          {deleting.vmId == null ? (
            <p>This removes the unprovisioned node record.</p>
          ) : (
            <p>
              This removes the record of {deleting.status === 'destroyed' ? 'destroyed' : 'missing'} VM {deleting.vmId} and its place in the node list. Its
              commands stay in the command history.
            </p>
          )}
        </ConfirmDialog>
      )}
    </div>
  );
}
