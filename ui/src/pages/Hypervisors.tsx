import { Fragment, useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useAgentVms, useAgents, useInstallInfo, useMutations, useNodes } from '../lib/queries';
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

/**
 * The install one-liner for scripts: the token is read without echo into TENDRIL_TOKEN
 * (`read -rs`), so shell history holds `$TENDRIL_TOKEN`, not the token.
 */
export function unattendedInstallCommand(install: string): string {
  return `IFS= read -rs TENDRIL_TOKEN && ${install.replace('| sh -s', '| TENDRIL_TOKEN="$TENDRIL_TOKEN" sh -s')}`;
}

/** An agent that has never connected: no heartbeat, no version, no host reported yet. */
export function neverConnected(a: Pick<Agent, 'lastHeartbeat' | 'connectedAt' | 'version' | 'hostname'>): boolean {
  return !a.lastHeartbeat && !a.connectedAt && !a.version && !a.hostname;
}

/** The Proxmox API calls tendril makes, and the privilege each needs (proxmox-api.md). */
export const PROXMOX_PRIVILEGES: readonly { priv: string; why: string }[] = [
  { priv: 'VM.Audit', why: 'list templates and VMs (/cluster/resources), read a VM’s status and config' },
  { priv: 'VM.Clone', why: 'clone the template' },
  { priv: 'VM.Allocate', why: 'create the clone’s VMID (also in a pool), and delete a VM on destroy' },
  { priv: 'VM.Config.CPU', why: 'set the cores' },
  { priv: 'VM.Config.Memory', why: 'set the memory' },
  { priv: 'VM.Config.Network', why: 'set net0 (bridge, VLAN)' },
  { priv: 'VM.Config.Options', why: 'description, tags, guest agent flag, start at boot' },
  { priv: 'VM.Config.Cloudinit', why: 'cloud-init user, SSH keys and IP configuration' },
  { priv: 'VM.Config.Disk', why: 'grow the disk (clone option)' },
  { priv: 'VM.PowerMgmt', why: 'start, shut down, stop, reboot' },
  { priv: 'VM.GuestAgent.Audit', why: 'read the VM’s IP from the QEMU guest agent' },
  { priv: 'VM.GuestAgent.Unrestricted', why: 'post-provision commands (guest agent exec); leave it out if no template runs any' },
  { priv: 'Datastore.AllocateSpace', why: 'disk space for full clones and grown disks' },
  { priv: 'SDN.Use', why: 'attach the NIC to its bridge (checked on /sdn/zones/localnetwork/<bridge>)' },
  { priv: 'Sys.Audit', why: 'list the nodes, read task status and logs' },
];

/** The `pveum` commands for a user, a role with only those privileges and a privilege-separated token. */
export function pveumCommands(user = 'trellis@pve', tokenName = 'tendril'): string {
  const privs = PROXMOX_PRIVILEGES.map((p) => p.priv).join(',');
  return [
    '# A role with only what tendril calls (Proxmox VE 9; on 8.x use VM.Monitor instead of the two VM.GuestAgent.* privileges)',
    `pveum role add TrellisAgent --privs "${privs}"`,
    '# A user for the agent, and a privilege-separated API token (its secret is printed once)',
    `pveum user add ${user} --comment "Trellis agent (tendril)"`,
    `pveum user token add ${user} ${tokenName} --privsep 1 --comment "tendril"`,
    '# The role on / for the user and for the token: a privilege-separated token gets only what both have',
    `pveum acl modify / --users ${user} --roles TrellisAgent`,
    `pveum acl modify / --tokens '${user}!${tokenName}' --roles TrellisAgent`,
  ].join('\n');
}

/** How to read the SHA-256 fingerprint of the certificate the Proxmox API serves. */
export const FINGERPRINT_COMMANDS = [
  '# On the Proxmox host: every certificate with its fingerprint (pveproxy-ssl.pem, a custom one, is what port 8006 serves when present)',
  'pvenode cert info --output-format json',
  '# or just the fingerprint of the default certificate',
  'openssl x509 -in /etc/pve/local/pve-ssl.pem -noout -fingerprint -sha256',
  '# From any machine: the certificate the API actually serves',
  'openssl s_client -connect pve1.example.com:8006 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256',
].join('\n');

/** The Proxmox side of an install: the API token with its minimal role, and the fingerprint. */
function ProxmoxSetupHelp() {
  const pveum = pveumCommands();
  return (
    <details className="setup-help" data-testid="proxmox-setup-help">
      <summary>Proxmox API token and certificate fingerprint</summary>
      <h4>The API token</h4>
      <p className="small">
        tendril talks to the Proxmox API with an API token (<code>PROXMOX_TOKEN_ID</code> = <code>user@realm!tokenid</code>, and its secret). Give it a
        role with only the privileges tendril uses, on a user of its own, and a privilege-separated token. Run as root on a Proxmox node:
      </p>
      <div className="codeblock">
        <pre data-testid="pveum-commands">{pveum}</pre>
        <CopyButton text={pveum} label="Copy pveum commands" />
      </div>
      <p className="small">
        The token id is then <code>trellis@pve!tendril</code>; <code>pveum user token add</code> prints its secret once. A clone into a pool needs nothing more:
        Proxmox checks <code>VM.Allocate</code> on <code>/pool/&lt;pool&gt;</code>, which the ACL on <code>/</code> covers.
      </p>
      <table className="table table-compact" data-testid="proxmox-privileges">
        <caption className="sr-only">Why each privilege is needed</caption>
        <thead>
          <tr>
            <th scope="col">Privilege</th>
            <th scope="col">Used to</th>
          </tr>
        </thead>
        <tbody>
          {PROXMOX_PRIVILEGES.map((p) => (
            <tr key={p.priv}>
              <td className="mono small">{p.priv}</td>
              <td className="small">{p.why}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h4>The certificate fingerprint</h4>
      <p className="small">
        Proxmox serves a self-signed certificate, which tendril pins by its SHA-256 fingerprint (<code>PROXMOX_TLS_FINGERPRINT=AA:BB:…</code>, or{' '}
        <code>--proxmox-fingerprint</code>). Run on the Proxmox host itself, the install script reads it; otherwise:
      </p>
      <div className="codeblock">
        <pre data-testid="fingerprint-commands">{FINGERPRINT_COMMANDS}</pre>
        <CopyButton text={FINGERPRINT_COMMANDS} label="Copy fingerprint commands" />
      </div>
      <p className="small">
        Each node of a cluster has its own certificate: pin the one of the node in <code>PROXMOX_URL</code>, or trust the cluster CA with{' '}
        <code>PROXMOX_CA_FILE=/etc/pve/pve-root-ca.pem</code>.
      </p>
    </details>
  );
}

/**
 * The install line of an agent that has never connected, without its token: the script asks
 * for the token given at registration (or reads TENDRIL_TOKEN), so nothing needs rotating.
 */
function PendingInstall({ agent, onRotate }: { agent: Agent; onRotate: () => void }) {
  const info = useInstallInfo();
  const baseUrl = info.data?.publicUrl || window.location.origin;
  const install = installCommand({ baseUrl, serverPublicKey: info.data?.serverPublicKey });
  const unattended = unattendedInstallCommand(install);
  const helpId = `pending-install-help-${agent.id}`;
  return (
    <section className="pending-install" aria-label={`Install ${agent.name}`} data-testid="pending-install" data-agent-id={agent.id}>
      <p id={helpId}>
        <strong>{agent.name} has never connected.</strong> Install it on the Proxmox host, as root; the script asks for the token shown when it was
        registered (it is not shown again, and not part of this line).
      </p>
      {info.isPending ? (
        <Spinner label="Loading the install line" />
      ) : (
        <>
          <div className="codeblock">
            <pre data-testid="pending-install-command" aria-describedby={helpId}>
              {install}
            </pre>
            <CopyButton text={install} label="Copy install command" />
          </div>
          <p className="small muted">
            Unattended (the token is typed without echo into <code>TENDRIL_TOKEN</code>, so shell history holds <code>$TENDRIL_TOKEN</code>, not the
            token):
          </p>
          <div className="codeblock">
            <pre data-testid="pending-install-unattended">{unattended}</pre>
            <CopyButton text={unattended} label="Copy unattended command" />
          </div>
        </>
      )}
      {info.error && <ErrorBox title="Cannot load the install settings">{errorMessage(info.error)}</ErrorBox>}
      <p className="small">
        Token lost?{' '}
        <button type="button" className="linkbtn" onClick={onRotate}>
          Rotate it
        </button>{' '}
        to get a new one (the old one stops working).
      </p>
      <ProxmoxSetupHelp />
    </section>
  );
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
  // A rotated token comes without them: the server's install settings then.
  const info = useInstallInfo();
  const pubUrl = publicUrl ?? info.data?.publicUrl;
  const key = serverPublicKey ?? info.data?.serverPublicKey;
  // The server's --public-url when it has one, else the address this browser reached it at.
  const baseUrl = pubUrl || window.location.origin;
  const serverUrl = pubUrl ? connectUrlOf(pubUrl) : agentConnectUrl();
  const install = installCommand({ baseUrl, serverPublicKey: key, pveUrl, tokenId });
  const cmd = agentCommand({ serverUrl, token, pveUrl, tokenId, serverPublicKey: key });
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
        <Field label="Proxmox API token id (optional)" hint="user@realm!tokenid; see below for the role it needs">
          {(p) => <input {...p} placeholder="trellis@pve!tendril" value={tokenId} onChange={(e) => setTokenId(e.target.value)} />}
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
      <ProxmoxSetupHelp />
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
                      {neverConnected(a) && (
                        <span className="tag tag-warn" data-testid="never-connected">
                          never connected
                        </span>
                      )}
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
                  {neverConnected(a) && (
                    <tr className="detail-row">
                      <td colSpan={8}>
                        <PendingInstall
                          agent={a}
                          onRotate={() => {
                            setActionErr(null);
                            setConfirm({ kind: 'rotate', agent: a });
                          }}
                        />
                      </td>
                    </tr>
                  )}
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
