import { describe, expect, it } from 'vitest';
import {
  PROXMOX_PRIVILEGES,
  agentCommand,
  agentConnectUrl,
  connectUrlOf,
  installCommand,
  isLoopbackHost,
  needsInsecurePlaintext,
  neverConnected,
  proxmoxHost,
  proxmoxNodes,
  pveumCommands,
  unattendedInstallCommand,
} from './Hypervisors';
import { configErrors, hypervisorUnavailable, initialStep } from './provision/provisionReducer';
import { buildSnapshot, validateDeploy } from './Deploy';
import type { Agent, VmNode } from '../lib/types';

const agent = (over: Partial<Agent> = {}): Agent => ({
  id: 'a1',
  name: 'pve-1',
  status: 'online',
  lastHeartbeat: null,
  connectedAt: null,
  version: '0.1.0',
  hostname: 'pve-1',
  capabilities: ['ping', 'provision', 'list_templates'],
  facts: {},
  maxConcurrency: 4,
  createdAt: '2026-11-25T09:00:00Z',
  ...over,
});

const node = (over: Partial<VmNode> = {}): VmNode => ({
  id: 'n1',
  application: null,
  name: 'web-1',
  templateId: 't1',
  memory: 2048,
  cores: 2,
  vmId: null,
  hypervisorId: null,
  ipAddress: null,
  status: 'pending_provision',
  lastCommandId: null,
  error: null,
  createdAt: '',
  updatedAt: '',
  ...over,
});

describe('hypervisor selection', () => {
  it('only online hypervisors with the provision capability are selectable', () => {
    expect(hypervisorUnavailable(agent())).toBeNull();
    expect(hypervisorUnavailable(agent({ status: 'offline' }))).toMatch(/Offline/);
    expect(hypervisorUnavailable(agent({ capabilities: ['terraform_apply'] }))).toMatch(/provision capability/);
  });
});

describe('initialStep', () => {
  it('reopens the live command of a provisioning or failed node', () => {
    expect(initialStep(node({ status: 'provisioning', lastCommandId: 'c9' }))).toEqual({ step: 'provisioning', commandId: 'c9' });
    expect(initialStep(node({ status: 'failed', lastCommandId: 'c8' }))).toEqual({ step: 'provisioning', commandId: 'c8' });
    expect(initialStep(node({ status: 'running', vmId: 101, lastCommandId: 'c7' }))).toEqual({ step: 'provisioning', commandId: 'c7' });
    expect(initialStep(node())).toEqual({ step: 'hypervisor', commandId: null });
    expect(initialStep(null)).toEqual({ step: 'hypervisor', commandId: null });
  });
});

describe('configure step validation', () => {
  it('reports each field', () => {
    const e = configErrors({ name: 'bad name', memory: '8', cores: '0', application: '' }, true);
    expect(e.name).toMatch(/letters/);
    expect(e.memory).toMatch(/at least 16/);
    expect(e.cores).toMatch(/at least 1/);
    expect(Object.values(configErrors({ name: 'ok-1', memory: '1024', cores: '1', application: '' }, true)).every((v) => !v)).toBe(true);
    expect(configErrors({ name: '', memory: '1024', cores: '1', application: '' }, false).name).toBeNull();
  });
});

describe('agent registration command', () => {
  it('derives ws/wss from the page', () => {
    expect(agentConnectUrl({ protocol: 'https:', host: 'trellis.example.com' })).toBe('wss://trellis.example.com/api/agents/connect');
    expect(agentConnectUrl({ protocol: 'http:', host: '127.0.0.1:8080' })).toBe('ws://127.0.0.1:8080/api/agents/connect');
  });
  it('builds the exact tendril command, quoting where the shell needs it', () => {
    expect(agentCommand({ serverUrl: 'ws://127.0.0.1:8080/api/agents/connect', token: 'tok123' })).toBe(
      'TENDRIL_SERVER_URL=ws://127.0.0.1:8080/api/agents/connect TENDRIL_TOKEN=tok123 PROXMOX_URL=https://<pve>:8006 PROXMOX_TOKEN_ID=… PROXMOX_TOKEN_SECRET=… tendril',
    );
    // tendril refuses ws:// to a host that is not loopback without the flag.
    expect(agentCommand({ serverUrl: 'ws://h:8080/api/agents/connect', token: 'tok123' })).toBe(
      'TENDRIL_SERVER_URL=ws://h:8080/api/agents/connect TENDRIL_TOKEN=tok123 PROXMOX_URL=https://<pve>:8006 PROXMOX_TOKEN_ID=… PROXMOX_TOKEN_SECRET=… tendril --insecure-plaintext',
    );
    expect(agentCommand({ serverUrl: 'wss://h/api/agents/connect', token: 't' })).not.toContain('--insecure-plaintext');
    expect(agentCommand({ serverUrl: 'wss://x/api/agents/connect', token: 't', pveUrl: 'https://pve1:8006', tokenId: 'root@pam!trellis' })).toContain(
      "PROXMOX_URL=https://pve1:8006 PROXMOX_TOKEN_ID='root@pam!trellis'",
    );
    // The dispatch-signing key from the registration answer is pinned by the command.
    const key = 'fMiNqAcXQbiIG8CjZhIx9LX9anWMFITkfjIXhwTe5hc=';
    const pinned = agentCommand({ serverUrl: 'wss://x/api/agents/connect', token: 't', serverPublicKey: key });
    expect(pinned).toContain(`TENDRIL_SERVER_PUBLIC_KEY=`);
    expect(pinned).toContain(key);
    expect(agentCommand({ serverUrl: 'wss://x/api/agents/connect', token: 't' })).not.toContain('TENDRIL_SERVER_PUBLIC_KEY');
  });
  it('asks for --insecure-plaintext exactly where tendril would refuse ws://', () => {
    for (const host of ['localhost', 'localhost:8080', 'LOCALHOST.', '127.0.0.1', '127.1.2.3:80', '[::1]', '[::1]:8080', '[::ffff:7f00:1]', '[::ffff:127.0.0.1]']) {
      expect(isLoopbackHost(host), host).toBe(true);
      expect(needsInsecurePlaintext(`ws://${host}/api/agents/connect`), host).toBe(false);
    }
    for (const host of ['h', 'trellis.example.com:8080', '10.0.0.5', '128.0.0.1', '127.0.0.1.nip.io', '[2001:db8::1]', '[::ffff:a00:1]', 'localhost.example']) {
      expect(isLoopbackHost(host), host).toBe(false);
      expect(needsInsecurePlaintext(`ws://${host}/api/agents/connect`), host).toBe(true);
      expect(needsInsecurePlaintext(`wss://${host}/api/agents/connect`), host).toBe(false);
    }
    expect(needsInsecurePlaintext(agentConnectUrl({ protocol: 'http:', host: '10.1.1.1:8080' }))).toBe(true);
    expect(needsInsecurePlaintext(agentConnectUrl({ protocol: 'https:', host: '10.1.1.1' }))).toBe(false);
  });
  it('builds the install one-liner without any secret in it', () => {
    expect(installCommand({ baseUrl: 'https://trellis.example.com/' })).toBe(
      'curl -fsSL https://trellis.example.com/install/tendril.sh | sh -s -- --server https://trellis.example.com',
    );
    const key = 'fMiNqAcXQbiIG8CjZhIx9LX9anWMFITkfjIXhwTe5hc=';
    const full = installCommand({ baseUrl: 'https://t', serverPublicKey: key, pveUrl: 'https://127.0.0.1:8006', tokenId: 'root@pam!trellis' });
    expect(full).toBe(
      `curl -fsSL https://t/install/tendril.sh | sh -s -- --server https://t --server-public-key ${key} --proxmox-url https://127.0.0.1:8006 --proxmox-token-id 'root@pam!trellis'`,
    );
    expect(full).not.toMatch(/TOKEN=|trl_agent_/);
    // Plain http to a host that is not loopback: tendril needs the flag; loopback does not.
    expect(installCommand({ baseUrl: 'http://10.0.0.5:8080' })).toContain('--insecure-plaintext');
    expect(installCommand({ baseUrl: 'http://127.0.0.1:8080' })).not.toContain('--insecure-plaintext');
    expect(connectUrlOf('https://t:8443/')).toBe('wss://t:8443/api/agents/connect');
    expect(connectUrlOf('http://t')).toBe('ws://t/api/agents/connect');
  });
  it('gives an unattended form that keeps the token in a variable, never in the line', () => {
    const line = installCommand({ baseUrl: 'https://t', serverPublicKey: 'K' });
    expect(unattendedInstallCommand(line)).toBe(
      'IFS= read -rs TENDRIL_TOKEN && curl -fsSL https://t/install/tendril.sh | TENDRIL_TOKEN="$TENDRIL_TOKEN" sh -s -- --server https://t --server-public-key K',
    );
  });
  it('tells a never-connected agent from one that connected once', () => {
    const fresh = { lastHeartbeat: null, connectedAt: null, version: null, hostname: null };
    expect(neverConnected(fresh)).toBe(true);
    expect(neverConnected({ ...fresh, lastHeartbeat: '2026-01-01T00:00:00Z' })).toBe(false);
    expect(neverConnected({ ...fresh, hostname: 'pve1' })).toBe(false);
  });
  it('documents a minimal Proxmox role for a privilege-separated token', () => {
    const cmds = pveumCommands('trellis@pve', 'tendril');
    expect(cmds).toContain('pveum user token add trellis@pve tendril --privsep 1');
    expect(cmds).toContain("pveum acl modify / --tokens 'trellis@pve!tendril' --roles TrellisAgent");
    expect(cmds).toContain('pveum acl modify / --users trellis@pve --roles TrellisAgent');
    const privs = /--privs "([^"]+)"/.exec(cmds)![1].split(',');
    expect(privs).toEqual(PROXMOX_PRIVILEGES.map((p) => p.priv));
    // What the agent calls, and nothing that administers Proxmox itself.
    for (const p of ['VM.Clone', 'VM.Allocate', 'VM.PowerMgmt', 'VM.Audit', 'VM.Config.Network', 'VM.Config.Cloudinit', 'SDN.Use', 'Sys.Audit']) expect(privs).toContain(p);
    for (const p of ['Sys.Modify', 'Permissions.Modify', 'User.Modify', 'Realm.Allocate', 'Datastore.Allocate']) expect(privs).not.toContain(p);
  });
  it('reads proxmox facts', () => {
    expect(proxmoxNodes({ proxmox_nodes: ['pve1', { node: 'pve2' }] })).toEqual(['pve1', 'pve2']);
    expect(proxmoxNodes(null)).toEqual([]);
    expect(proxmoxHost({ proxmox_url: 'https://10.0.0.2:8006/' })).toBe('10.0.0.2:8006');
  });
});

describe('deploy snapshot', () => {
  const f = {
    agentId: 'a1',
    repo: ' /srv/tf/app ',
    version: 'v1.0.0',
    path: './envs/prod',
    workspace: '',
    vars: '{"region":"eu"}',
    sensitive: 'db_password, api_key',
    reason: 'release',
    timeout: '',
  };
  it('builds the config snapshot of the contract', () => {
    expect(buildSnapshot(f, { region: 'eu' })).toEqual({
      template_source: { repo: '/srv/tf/app', version: 'v1.0.0', path: 'envs/prod' },
      terraform_vars: { region: 'eu' },
      sensitive_vars: ['db_password', 'api_key'],
      meta: { triggered_by: 'trellis-ui', reason: 'release' },
    });
    expect(buildSnapshot({ ...f, path: '' }, {}).template_source).toEqual({ repo: '/srv/tf/app', version: 'v1.0.0' });
    expect(buildSnapshot({ ...f, workspace: ' web-prod ' }, {}).workspace_key).toBe('web-prod');
    expect(buildSnapshot(f, {})).not.toHaveProperty('workspace_key');
  });
  it('validates the form', () => {
    expect(Object.values(validateDeploy(f)).every((v) => !v)).toBe(true);
    const e = validateDeploy({ ...f, agentId: '', repo: '', vars: '{oops', timeout: '5' });
    expect(e.agentId).toMatch(/agent/);
    expect(e.repo).toMatch(/required/);
    expect(e.vars).toMatch(/not valid JSON/);
    expect(e.timeout).toMatch(/10/);
  });
});
