import { Fragment, useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useAgentVms, useAgents, useMutations, useNodes } from '../lib/queries';
import type { Agent, AgentVm, VmNode } from '../lib/types';
import { ConfirmDialog, Modal } from '../components/Modal';
import { CopyButton, Empty, ErrorBox, Field, JsonView, Notice, RelTime, Spinner, StatusPill } from '../components/ui';

/** The agent connect URL for this control plane, as seen from the browser. */
export function agentConnectUrl(loc: { protocol: string; host: string } = window.location): string {
  const scheme = loc.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${loc.host}/api/agents/connect`;
}

function shellQuote(v: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(v) ? v : `'${v.replace(/'/g, `'\\''`)}'`;
}

/**
 * Whether a host (as in a URL: `name`, `1.2.3.4`, `[v6]`, with or without a port) is
 * loopback the way tendril decides it: 127.0.0.0/8, `::1` (also IPv4-mapped 127.x), or
 * the name `localhost`. Other names are not resolved.
 */
export function isLoopbackHost(host: string): boolean {
  let h = host.trim().toLowerCase();
  if (h.startsWith('[')) h = h.slice(1, h.indexOf(']') > 0 ? h.indexOf(']') : undefined);
  else h = h.split(':')[0];
  if (h.endsWith('.')) h = h.slice(0, -1);
  if (h === 'localhost') return true;
  if (/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h)) return h.split('.').every((o) => Number(o) <= 255);
  if (h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  // IPv4-mapped 127.x: ::ffff:127.0.0.1, or as URL normalises it, ::ffff:7fxx:xxxx.
  return /^::ffff:127\./.test(h) || /^::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}$/.test(h);
}

/**
 * tendril refuses `ws://` to a host that is not loopback (the token and every command
 * would travel in clear) unless it is given `--insecure-plaintext`.
 */
export function needsInsecurePlaintext(serverUrl: string): boolean {
  const m = /^ws:\/\/([^/?#]*)/i.exec(serverUrl.trim());
  if (!m) return false;
  const authority = m[1].slice(m[1].lastIndexOf('@') + 1);
  return !isLoopbackHost(authority);
}

export function agentCommand(opts: { serverUrl: string; token: string; pveUrl?: string; tokenId?: string; serverPublicKey?: string }): string {
  const pve = opts.pveUrl?.trim() || 'https://<pve>:8006';
  const id = opts.tokenId?.trim() || '…';
  return [
    `TENDRIL_SERVER_URL=${shellQuote(opts.serverUrl)}`,
    `TENDRIL_TOKEN=${shellQuote(opts.token)}`,
    // Pins the control plane's dispatch-signing key (else trusted on first use).
    ...(opts.serverPublicKey ? [`TENDRIL_SERVER_PUBLIC_KEY=${shellQuote(opts.serverPublicKey)}`] : []),
    `PROXMOX_URL=${pve.includes('<') ? pve : shellQuote(pve)}`,
    `PROXMOX_TOKEN_ID=${id === '…' ? id : shellQuote(id)}`,
    `PROXMOX_TOKEN_SECRET=…`,
    'tendril',
    ...(needsInsecurePlaintext(opts.serverUrl) ? ['--insecure-plaintext'] : []),
  ].join(' ');
}

/** The agent connect URL of a control plane reached at `baseUrl` (http(s)://host[:port]). */
export function connectUrlOf(baseUrl: string): string {
  return `${baseUrl.replace(/\/+$/, '').replace(/^http/i, 'ws')}/api/agents/connect`;
}

/**
 * The install one-liner: fetches trellis's install script and runs it. It carries no
 * secret — the script asks for the agent token (and the Proxmox token secret) on the
 * terminal, or takes TENDRIL_TOKEN / PROXMOX_TOKEN_SECRET from the environment — so
 * neither lands in shell history or in `ps`.
 */
export function installCommand(opts: { baseUrl: string; serverPublicKey?: string; pveUrl?: string; tokenId?: string }): string {
  const base = opts.baseUrl.replace(/\/+$/, '');
  const args = [`--server ${shellQuote(base)}`];
  if (opts.serverPublicKey) args.push(`--server-public-key ${shellQuote(opts.serverPublicKey)}`);
  if (needsInsecurePlaintext(connectUrlOf(base))) args.push('--insecure-plaintext');
  if (opts.pveUrl?.trim()) args.push(`--proxmox-url ${shellQuote(opts.pveUrl.trim())}`);
  if (opts.tokenId?.trim()) args.push(`--proxmox-token-id ${shellQuote(opts.tokenId.trim())}`);
  return `curl -fsSL ${shellQuote(`${base}/install/tendril.sh`)} | sh -s -- ${args.join(' ')}`;
}

function asRecord(v: unknown): Record<string, unknown> | null {
  return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
}

/** Proxmox node names from an agent's facts (several shapes tolerated). */
export function proxmoxNodes(agentFacts: unknown): string[] {
  const facts = asRecord(agentFacts);
  if (!facts) return [];
  const raw = facts.proxmoxNodes ?? facts.proxmox_nodes ?? facts.nodes ?? (facts.proxmox as Record<string, unknown> | undefined)?.nodes;
  if (!Array.isArray(raw)) return [];
  return raw
    .map((n) => (typeof n === 'string' ? n : typeof n === 'object' && n ? String((n as Record<string, unknown>).node ?? (n as Record<string, unknown>).name ?? '') : ''))
    .filter(Boolean);
}

/** The Proxmox API host the agent talks to, from facts.proxmox_url. */
export function proxmoxHost(agentFacts: unknown): string | null {
  const facts = asRecord(agentFacts);
  const u = facts?.proxmox_url ?? facts?.proxmoxUrl;
  if (typeof u !== 'string' || !u) return null;
  try {
    return new URL(u).host;
  } catch {
    return u;
  }
}

/** How Trellis relates to a VM of a hypervisor's inventory. */
export type VmTracking = 'tracked' | 'untracked-trellis' | 'foreign';

export function vmTracking(vm: Pick<AgentVm, 'nodeId' | 'tag'>): VmTracking {
  if (vm.nodeId) return 'tracked';
  return vm.tag ? 'untracked-trellis' : 'foreign';
}

/** The VMs one hypervisor reported in its latest inventory, with the node tracking each. */
export function AgentVms({ agent, nodes }: { agent: Agent; nodes: VmNode[] }) {
  const vms = useAgentVms(agent.id);
  const m = useMutations();
  const [importing, setImporting] = useState<AgentVm | null>(null);
  const headingId = `vms-${agent.id}`;
  const items = [...(vms.data ?? [])].sort((a, b) => a.vmId - b.vmId);
  const untracked = items.filter((v) => vmTracking(v) === 'untracked-trellis').length;
  const seen = items.reduce<string | null>((max, v) => (!max || v.seenAt > max ? v.seenAt : max), null);
  return (
    <section aria-labelledby={headingId} data-testid="agent-vms" data-agent-id={agent.id}>
      <h3 id={headingId}>
        VMs on {agent.name}{' '}
        {seen && (
          <span className="small muted">
            · inventory <RelTime ts={seen} />
          </span>
        )}
        {untracked > 0 && (
          <span className="tag tag-warn" data-testid="untracked-count">
            {untracked} untracked made by Trellis
          </span>
        )}
      </h3>
      {vms.error ? (
        <ErrorBox title={`Could not load the VMs of ${agent.name}`}>{errorMessage(vms.error)}</ErrorBox>
      ) : vms.isPending ? (
        <Spinner label={`Loading the VMs of ${agent.name}`} />
      ) : items.length === 0 ? (
        <p className="muted small">No inventory reported yet{agent.status === 'online' ? '' : ' (the hypervisor is offline)'}.</p>
      ) : (
        <div className="table-wrap">
          <table className="table table-stack">
            <thead>
              <tr>
                <th>VM id</th>
                <th>Name</th>
                <th className="hide-sm">Proxmox node</th>
                <th>Status</th>
                <th className="hide-md">IP</th>
                <th>Trellis</th>
              </tr>
            </thead>
            <tbody>
              {items.map((v) => {
                const tracking = vmTracking(v);
                const node = v.nodeId ? nodes.find((n) => n.id === v.nodeId) : undefined;
                return (
                  <tr key={`${v.node}/${v.vmId}`} data-vmid={v.vmId} data-tracking={tracking}>
                    <td data-label="VM id">{v.vmId}</td>
                    <td data-label="Name" className="nowrap">{v.name || '–'}</td>
                    <td data-label="Proxmox node" className="hide-sm">{v.node}</td>
                    <td data-label="Status">
                      <span className={`tag ${v.status === 'running' ? '' : 'tag-muted'}`}>{v.status}</span>
                    </td>
                    <td data-label="IP" className="hide-md mono small">{v.ipAddresses.join(', ') || '–'}</td>
                    <td data-label="Trellis">
                      {tracking === 'tracked' ? (
                        <a href="#/nodes" title="The node tracking this VM">
                          {`node ${node?.name ?? v.nodeId?.slice(0, 8)}`}
                        </a>
                      ) : tracking === 'untracked-trellis' ? (
                        <span className="tag tag-warn" title={`Tag ${v.tag}: Trellis made it, but no node tracks it (forgotten or left over)`}>
                          untracked — made by Trellis
                        </span>
                      ) : (
                        <span className="muted small">not Trellis</span>
                      )}
                      {tracking !== 'tracked' && (
                        <button
                          type="button"
                          className="btn btn-sm"
                          onClick={() => setImporting(v)}
                          aria-label={`Import VM ${v.vmId} ${v.name} as a node`}
                          data-testid="vm-import"
                        >
                          Import
                        </button>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {importing && <ImportVmDialog agent={agent} vm={importing} nodes={nodes} onImport={m.importNode} onClose={() => setImporting(null)} />}
    </section>
  );
}

function TokenReveal({
  agent,
  token,
  serverPublicKey,
  publicUrl,
}: {
  agent: Agent;
  token: string;
  serverPublicKey?: string;
  publicUrl?: string | null;
}) {
  const [pveUrl, setPveUrl] = useState('');
  const [tokenId, setTokenId] = useState('');
  // The server's --public-url when it has one, else the address this browser reached it at.
  const baseUrl = publicUrl || window.location.origin;
  const serverUrl = publicUrl ? connectUrlOf(publicUrl) : agentConnectUrl();
  const install = installCommand({ baseUrl, serverPublicKey, pveUrl, tokenId });
  const cmd = agentCommand({ serverUrl, token, pveUrl, tokenId, serverPublicKey });
  const plaintext = needsInsecurePlaintext(serverUrl);
  return (
    <div className="token-reveal" data-testid="token-reveal">
      <Notice tone="warn">
        This token for <strong>{agent.name}</strong> is shown <strong>once</strong>. Copy it now; Trellis stores only its hash.
      </Notice>
      <div className="kv">
        <span className="kv-k">Agent id</span>
        <code>{agent.id}</code>
        <span className="kv-k">Token</span>
        <span className="token-line">
          <code data-testid="agent-token">{token}</code>
          <CopyButton text={token} label="Copy token" />
        </span>
      </div>
      <h3>Install the agent on the Proxmox host</h3>
      <div className="grid2">
        <Field label="Proxmox API URL (optional)" hint="Fills the commands below">
          {(p) => <input {...p} placeholder="https://pve1.example.com:8006" value={pveUrl} onChange={(e) => setPveUrl(e.target.value)} />}
        </Field>
        <Field label="Proxmox API token id (optional)" hint="user@realm!tokenid">
          {(p) => <input {...p} placeholder="root@pam!trellis" value={tokenId} onChange={(e) => setTokenId(e.target.value)} />}
        </Field>
      </div>
      {plaintext && (
        <div data-testid="plaintext-warning">
          <Notice tone="warn">
            <strong>Not encrypted.</strong> Trellis is served over plain HTTP, so the agent connects with <code>ws://</code>: its token and
            every command (Terraform variables included) travel in clear over the network. The command below passes{' '}
            <code>--insecure-plaintext</code>, without which tendril refuses such a connection. Enable TLS on Trellis (
            <code>--tls-cert</code> and <code>--tls-key</code>, or a TLS-terminating proxy) and open it over <code>https://</code>, so
            the command uses <code>wss://</code>.
          </Notice>
        </div>
      )}
      <p id="install-command-help">
        Run as root on the host. The script downloads tendril from this Trellis, asks for the token above (and the Proxmox token
        secret) without echoing it, so neither ends up in shell history, installs and starts the <code>tendril</code> systemd
        service, and waits until the agent is online. On a Proxmox host it reads the certificate fingerprint itself.
      </p>
      <div className="codeblock">
        <pre data-testid="install-command" aria-describedby="install-command-help">
          {install}
        </pre>
        <CopyButton text={install} label="Copy install command" />
      </div>
      <details>
        <summary>Or run tendril by hand</summary>
        <div className="codeblock">
          <pre data-testid="agent-command">{cmd}</pre>
          <CopyButton text={cmd} label="Copy command" />
        </div>
        <p className="muted small">
          Replace <code>…</code> with the Proxmox API token id and secret. For a self-signed Proxmox certificate add{' '}
          <code>PROXMOX_TLS_FINGERPRINT=…</code> or <code>PROXMOX_CA_FILE=…</code>.
        </p>
      </details>
    </div>
  );
}

function RegisterDialog({ onClose }: { onClose: () => void }) {
  const m = useMutations();
  const [name, setName] = useState('');
  const [maxConc, setMaxConc] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [created, setCreated] = useState<{ agent: Agent; token: string; serverPublicKey?: string; publicUrl?: string | null } | null>(null);
  const nameErr = name.trim() === '' ? 'Name is required.' : name.length > 100 ? 'Name is too long.' : null;
  const concErr = maxConc.trim() === '' ? null : /^\d+$/.test(maxConc.trim()) && Number(maxConc) >= 1 && Number(maxConc) <= 1000 ? null : 'A number from 1 to 1000.';
  const [touched, setTouched] = useState(false);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched(true);
    if (nameErr || concErr) return;
    setBusy(true);
    setError(null);
    try {
      const r = await m.createAgent(name.trim(), maxConc.trim() ? Number(maxConc) : undefined);
      setCreated(r);
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <Modal
      title={created ? `Hypervisor “${created.agent.name}” registered` : 'Register hypervisor'}
      onClose={onClose}
      wide={!!created}
      testId="register-dialog"
      footer={
        created ? (
          <button type="button" className="btn btn-primary" onClick={onClose}>
            Done
          </button>
        ) : (
          <>
            <button type="button" className="btn" onClick={onClose}>
              Cancel
            </button>
            <button type="submit" form="register-form" className="btn btn-primary" disabled={busy} data-testid="register-submit">
              {busy ? 'Registering…' : 'Register'}
            </button>
          </>
        )
      }
    >
      {created ? (
        <TokenReveal agent={created.agent} token={created.token} serverPublicKey={created.serverPublicKey} publicUrl={created.publicUrl} />
      ) : (
        <form id="register-form" onSubmit={submit} noValidate>
          <Field label="Name" error={touched ? nameErr : null} hint="Shown in the UI, e.g. pve-lab-1">
            {(p) => <input {...p} value={name} onChange={(e) => setName(e.target.value)} data-autofocus data-testid="register-name" />}
          </Field>
          <Field label="Max concurrent commands (optional)" error={concErr}>
            {(p) => <input {...p} inputMode="numeric" value={maxConc} onChange={(e) => setMaxConc(e.target.value)} placeholder="default" />}
          </Field>
          {error && <ErrorBox title="Could not register">{error}</ErrorBox>}
        </form>
      )}
    </Modal>
  );
}

export function Hypervisors() {
  const agents = useAgents();
  const nodes = useNodes();
  const m = useMutations();
  const [registering, setRegistering] = useState(false);
  const [confirm, setConfirm] = useState<{ kind: 'rotate' | 'revoke'; agent: Agent } | null>(null);
  const [busy, setBusy] = useState(false);
  const [actionErr, setActionErr] = useState<string | null>(null);
  const [revealed, setRevealed] = useState<{ agent: Agent; token: string } | null>(null);
  const [expanded, setExpanded] = useState<string | null>(null);

  const items = agents.data ?? [];
  const online = items.filter((a) => a.status === 'online').length;

  const doConfirm = async () => {
    if (!confirm) return;
    setBusy(true);
    setActionErr(null);
    try {
      if (confirm.kind === 'rotate') {
        const r = await m.rotateAgentToken(confirm.agent.id);
        setRevealed({ agent: confirm.agent, token: r.token });
      } else {
        await m.deleteAgent(confirm.agent.id);
      }
      setConfirm(null);
    } catch (e) {
      setActionErr(errorMessage(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="page">
      <header className="page-head">
        <div>
          <h1>Hypervisors</h1>
          <p className="muted">
            Tendril agents connected to this control plane.{' '}
            {agents.data && (
              <span data-testid="agents-summary">
                {online} of {items.length} online
              </span>
            )}
          </p>
        </div>
        <button type="button" className="btn btn-primary" onClick={() => setRegistering(true)} data-testid="register-hypervisor">
          Register hypervisor
        </button>
      </header>
      {agents.error && <ErrorBox title="Could not load hypervisors">{errorMessage(agents.error)} — retrying every few seconds.</ErrorBox>}
      {agents.isPending ? (
        <Spinner />
      ) : items.length === 0 ? (
        <Empty>
          No hypervisors yet. <button type="button" className="linkbtn" onClick={() => setRegistering(true)}>Register one</button> and run
          the agent on the Proxmox host.
        </Empty>
      ) : (
        <div className="table-wrap">
          <table className="table table-stack" data-testid="agents-table">
            <thead>
              <tr>
                <th>Name</th>
                <th>Status</th>
                <th>Last heartbeat</th>
                <th className="hide-sm">Host</th>
                <th className="hide-sm">Version</th>
                <th className="hide-md">Capabilities</th>
                <th className="hide-md">Proxmox</th>
                <th className="actions-col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {items.map((a) => (
                <Fragment key={a.id}>
                  <tr data-agent-id={a.id} data-agent-name={a.name}>
                    <td data-label="Name" className="nowrap cell-title">
                      <button type="button" className="linkbtn strong" aria-expanded={expanded === a.id} onClick={() => setExpanded(expanded === a.id ? null : a.id)}>
                        {a.name}
                      </button>
                    </td>
                    <td data-label="Status">
                      <StatusPill status={a.status} />
                    </td>
                    <td data-label="Heartbeat" className="nowrap">
                      <RelTime ts={a.lastHeartbeat} />
                    </td>
                    <td data-label="Host" className="hide-sm">{a.hostname ?? '–'}</td>
                    <td data-label="Version" className="hide-sm">{a.version ?? '–'}</td>
                    <td data-label="Capabilities" className="hide-md">
                      <span className="tags">
                        {a.capabilities.map((c) => (
                          <span key={c} className="tag">
                            {c}
                          </span>
                        ))}
                      </span>
                    </td>
                    <td data-label="Proxmox" className="hide-md small">{proxmoxNodes(a.facts).join(', ') || proxmoxHost(a.facts) || '–'}</td>
                    <td className="actions-col">
                      <div className="row-actions">
                        <a className="btn btn-sm" href={`#/commands?agentId=${encodeURIComponent(a.id)}`}>
                          Commands
                        </a>
                        <button type="button" className="btn btn-sm" onClick={() => { setActionErr(null); setConfirm({ kind: 'rotate', agent: a }); }}>
                          Rotate token
                        </button>
                        <button type="button" className="btn btn-sm btn-danger-ghost" onClick={() => { setActionErr(null); setConfirm({ kind: 'revoke', agent: a }); }}>
                          Revoke
                        </button>
                      </div>
                    </td>
                  </tr>
                  {expanded === a.id && (
                    <tr className="detail-row">
                      <td colSpan={8}>
                        <div className="kv">
                          <span className="kv-k">Id</span>
                          <code>{a.id}</code>
                          <span className="kv-k">Connected</span>
                          <RelTime ts={a.connectedAt} />
                          <span className="kv-k">Registered</span>
                          <RelTime ts={a.createdAt} />
                          <span className="kv-k">Max concurrency</span>
                          <span>{a.maxConcurrency ?? '–'}</span>
                          <span className="kv-k">Capabilities</span>
                          <span>{a.capabilities.join(', ') || '–'}</span>
                        </div>
                        <h4>Facts</h4>
                        <JsonView value={a.facts ?? {}} />
                      </td>
                    </tr>
                  )}
                </Fragment>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {items.length > 0 && (
        <section className="vm-inventory" aria-labelledby="vm-inventory-title">
          <h2 id="vm-inventory-title">VMs</h2>
          <p className="muted small">The VMs each hypervisor last reported (periodically, and after each VM command). A VM with a Trellis tag that no node tracks was made by Trellis and then forgotten or left over.</p>
          {items.map((a) => (
            <AgentVms key={a.id} agent={a} nodes={nodes.data ?? []} />
          ))}
        </section>
      )}
      {registering && <RegisterDialog onClose={() => setRegistering(false)} />}
      {confirm && (
        <ConfirmDialog
          title={confirm.kind === 'rotate' ? `Rotate token of ${confirm.agent.name}?` : `Revoke ${confirm.agent.name}?`}
          confirmLabel={confirm.kind === 'rotate' ? 'Rotate token' : 'Revoke hypervisor'}
          danger
          busy={busy}
          error={actionErr}
          onConfirm={doConfirm}
          onCancel={() => setConfirm(null)}
        >
          {confirm.kind === 'rotate' ? (
            <p>
              The current token stops working at once; restart the agent on that host with the new token (shown next).
            </p>
          ) : (
            <p>
              The agent is disconnected and its token revoked. Commands queued for it will not run. This cannot be undone.
            </p>
          )}
        </ConfirmDialog>
      )}
      {revealed && (
        <Modal title={`New token for ${revealed.agent.name}`} onClose={() => setRevealed(null)} wide footer={<button type="button" className="btn btn-primary" onClick={() => setRevealed(null)}>Done</button>}>
          <TokenReveal agent={revealed.agent} token={revealed.token} />
        </Modal>
      )}
    </div>
  );
}

/** Import an inventory VM as a node: its name (default the VM's), warning when another node has it. */
function ImportVmDialog({
  agent,
  vm,
  nodes,
  onImport,
  onClose,
}: {
  agent: Agent;
  vm: AgentVm;
  nodes: VmNode[];
  onImport: (b: { agentId: string; vmId: number; name: string; force?: boolean }) => Promise<VmNode>;
  onClose: () => void;
}) {
  const [name, setName] = useState(vm.name);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const taken = nodes.some((n) => n.status !== 'destroyed' && n.name.toLowerCase() === name.trim().toLowerCase());
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await onImport({ agentId: agent.id, vmId: vm.vmId, name: name.trim(), ...(taken ? { force: true } : {}) });
      onClose();
    } catch (err) {
      setError(errorMessage(err));
      setBusy(false);
    }
  };
  return (
    <Modal
      title={`Import VM ${vm.vmId} as a node`}
      onClose={onClose}
      testId="import-vm-dialog"
      footer={
        <>
          <button type="button" className="btn" onClick={onClose}>
            Cancel
          </button>
          <span className="spacer" />
          <button type="submit" form="import-vm-form" className="btn btn-primary" disabled={busy || !name.trim()} data-testid="import-vm-submit">
            {busy ? 'Importing…' : taken ? 'Import anyway' : 'Import'}
          </button>
        </>
      }
    >
      <form id="import-vm-form" onSubmit={(e) => void submit(e)}>
        <p className="small">
          Trellis will track VM {vm.vmId} on {vm.node} ({vm.status}) as a node: start, shut down, stop and reboot work as for any node.
          {vm.tag ? ' It carries a Trellis tag, so Destroy works too.' : ' Trellis did not make it, so Trellis will not destroy it: forget the node and delete the VM in Proxmox.'}
        </p>
        <Field label="Node name" error={taken ? 'Another node already has this name; importing will keep both.' : null}>
          {(p) => <input {...p} value={name} onChange={(e) => setName(e.target.value)} data-autofocus data-testid="import-vm-name" autoComplete="off" />}
        </Field>
        {error && (
          <div className="field-error" role="alert">
            {error}
          </div>
        )}
      </form>
    </Modal>
  );
}
