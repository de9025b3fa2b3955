import { describe, expect, it } from 'vitest';
import type { Agent, Template, VmNode } from '../../lib/types';
import { cloneErrors, cloneOptionsOf, cloneSummary, EMPTY_CLONE, fieldOfError, withTemplateDefaults } from './cloneOptions';
import { derive, initProvisionState, nextBlocker, provisionReducer, provisionRequest, type Catalog, type ProvisionAction, type ProvisionState } from './provisionReducer';
import { loadLastChoice, saveLastChoice, withLastChoice } from './remember';
import { sshCommand } from '../nodeActions';

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA me@host';

const agent: Agent = {
  id: 'a1',
  name: 'pve-1',
  status: 'online',
  lastHeartbeat: null,
  connectedAt: null,
  version: '0.1.0',
  hostname: 'pve-1',
  capabilities: ['provision'],
  facts: {},
  maxConcurrency: 4,
  createdAt: '',
};

const template = (over: Partial<Template> = {}): Template => ({
  id: 't1',
  name: 'debian-12',
  description: null,
  memory: 2048,
  cores: 2,
  proxmoxTemplateId: 9000,
  proxmoxNode: 'pve1',
  networkBridge: null,
  preProvisionCommands: [],
  postProvisionCommands: [],
  system: false,
  createdAt: '',
  updatedAt: '',
  ...over,
});

const failedNode = {
  id: 'n1',
  application: null,
  name: 'web-1',
  templateId: 't1',
  memory: 2048,
  cores: 2,
  vmId: null,
  hypervisorId: 'a1',
  ipAddress: null,
  status: 'failed',
  lastCommandId: 'c1',
  error: 'boom',
  createdAt: '',
  updatedAt: '',
} as VmNode;

const catalog: Catalog = { agents: [agent], templates: [template()], nodeNames: ['db-1', 'Web-9'] };
const run = (s: ProvisionState, ...actions: ProvisionAction[]) => actions.reduce(provisionReducer, s);

describe('clone options form', () => {
  it('checks each field and builds the request body from the fields that are set', () => {
    expect(cloneErrors(EMPTY_CLONE)).toEqual({});
    expect(cloneOptionsOf(EMPTY_CLONE)).toBeUndefined();
    const bad = cloneErrors({
      ...EMPTY_CLONE,
      storage: '-x',
      vlanTag: '4095',
      sshKeys: 'not a key',
      ipMode: 'static',
      ipAddress: '10.0.0.5/24',
      gateway: '10.0.1.1',
      diskSizeGib: '0',
      tags: 'ok, -bad',
    });
    expect(Object.keys(bad).sort()).toEqual(['diskSizeGib', 'gateway', 'sshKeys', 'storage', 'tags', 'vlanTag']);
    const body = cloneOptionsOf({
      ...EMPTY_CLONE,
      storage: 'fast-ssd',
      diskSizeGib: '40',
      ciUser: 'deploy',
      sshKeys: `${KEY}\n\n`,
      ipMode: 'static',
      ipAddress: '10.0.0.5/24',
      gateway: '10.0.0.1',
      vlanTag: '42',
      tags: 'Prod web',
      onboot: true,
    });
    expect(body).toEqual({
      storage: 'fast-ssd',
      diskSizeGib: 40,
      ciUser: 'deploy',
      sshKeys: [KEY],
      ipConfig: { mode: 'static', address: '10.0.0.5/24', gateway: '10.0.0.1' },
      vlanTag: 42,
      tags: ['prod', 'web'],
      onboot: true,
    });
  });

  it('fills empty fields from the template defaults and maps error fields to form fields', () => {
    const c = withTemplateDefaults({ ...EMPTY_CLONE, pool: 'mine' }, template({ cloneDefaults: { ciUser: 'debian', pool: 'web', vlanTag: 7 } }));
    expect(c.ciUser).toBe('debian');
    expect(c.pool).toBe('mine');
    expect(c.vlanTag).toBe('7');
    expect(fieldOfError({ field: 'storage' })).toBe('storage');
    expect(fieldOfError({ field: 'disk_size_gib', status: 'cleaned_up' })).toBe('diskSizeGib');
    expect(fieldOfError({ status: 'cleaned_up' })).toBeNull();
  });
});

describe('template defaults switched off or cleared', () => {
  const defaults = { storage: 'fast-ssd', full: true, diskSizeGib: 16, ciUser: 'debian', sshKeys: ['ssh-ed25519 AAAAC3Nza k@h'], vlanTag: 42, pool: 'web', tags: ['prod'], onboot: true };
  const filled = () => withTemplateDefaults(EMPTY_CLONE, template({ cloneDefaults: defaults }));

  it('sends the defaults as filled in', () => {
    expect(cloneOptionsOf(filled())).toEqual(defaults);
  });

  it('sends an explicit clear for every pre-filled field that was emptied or unchecked', () => {
    const c = { ...filled(), storage: '', cloneMode: 'linked' as const, diskSizeGib: '', ciUser: '', sshKeys: '', vlanTag: '', pool: '', tags: '', onboot: false };
    expect(cloneOptionsOf(c)).toEqual({ storage: '', full: false, diskSizeGib: 0, ciUser: '', sshKeys: [], vlanTag: 0, pool: '', tags: [], onboot: false });
    // Proxmox's default clone type with the storage cleared is a linked clone
    expect(cloneOptionsOf({ ...c, cloneMode: '' })?.full).toBe(false);
    // only what was cleared shows in the review
    expect(cloneSummary(c).map((i) => i.field)).toEqual(['cloneMode']);
  });

  it('sends nothing extra without template defaults', () => {
    expect(cloneOptionsOf({ ...EMPTY_CLONE, onboot: false })).toBeUndefined();
  });
});

describe('change settings after a failure', () => {
  const opened = () => initProvisionState(failedNode);

  it('opens Configure with the failing field marked and focused, and editing it clears the mark', () => {
    const s0 = opened();
    expect(s0.step).toBe('provisioning');
    const s = run(s0, {
      type: 'changeSettings',
      error: { code: 'proxmox_error', message: "storage 'nope' does not exist", details: { field: 'storage', status: 'cleaned_up' } },
      params: { name: 'web-1', clone_options: { storage: 'nope', ci_user: 'debian' } },
    });
    expect(s.step).toBe('configure');
    expect(s.serverError).toEqual({ field: 'storage', message: "storage 'nope' does not exist" });
    expect(s.clone.storage).toBe('nope');
    expect(s.clone.ciUser).toBe('debian');
    const d = derive(s, catalog);
    expect(d.configErrors.storage).toBe("storage 'nope' does not exist");
    expect(nextBlocker(s, catalog)).not.toBeNull();
    const fixed = run(s, { type: 'setClone', clone: { ...s.clone, storage: 'local-lvm' } });
    expect(fixed.serverError).toBeNull();
    expect(derive(fixed, catalog).configErrors.storage).toBeFalsy();
    expect(nextBlocker(fixed, catalog)).toBeNull();
    expect(provisionRequest(fixed, 'a1').cloneOptions).toEqual({ storage: 'local-lvm', ciUser: 'debian' });
    // Editing another field keeps the mark.
    const other = run(s, { type: 'setClone', clone: { ...s.clone, pool: 'web' } });
    expect(other.serverError?.field).toBe('storage');
  });

  it('goes back to the first step when the error names no setting', () => {
    const s = run(opened(), { type: 'changeSettings', error: { code: 'proxmox_unreachable', message: 'down' } });
    expect(s.step).toBe('hypervisor');
    expect(s.serverError).toBeNull();
  });
});

describe('duplicate names', () => {
  const atConfigure = () =>
    run(
      initProvisionState(null),
      { type: 'selectAgent', agentId: 'a1' },
      { type: 'selectTemplate', templateId: 't1' },
      { type: 'setConfig', config: { name: 'web-9', memory: '1024', cores: '1', application: '' } },
    );

  it('warns when another node has the name (ignoring case) until the admin chooses to continue', () => {
    const s = atConfigure();
    const d = derive(s, catalog);
    expect(d.nameTaken).toBe(true);
    expect(d.configErrors.name).toMatch(/already has this name/);
    const forced = run(s, { type: 'setForceName', force: true });
    expect(derive(forced, catalog).configErrors.name).toBeFalsy();
    expect(derive(forced, catalog).nameTaken).toBe(true);
    // A new name resets the choice; a free name has no warning.
    const renamed = run(forced, { type: 'setConfig', config: { ...forced.config, name: 'web-10' } });
    expect(renamed.forceName).toBe(false);
    expect(derive(renamed, catalog).nameTaken).toBe(false);
  });
});

describe('remembered choices and SSH command', () => {
  it('preselects the last hypervisor and template for a new node only', () => {
    const store = new Map<string, string>();
    const storage = { getItem: (k: string) => store.get(k) ?? null, setItem: (k: string, v: string) => void store.set(k, v) };
    expect(loadLastChoice(storage)).toEqual({});
    saveLastChoice({ agentId: 'a1', templateId: 't1' }, storage);
    const last = loadLastChoice(storage);
    const s = withLastChoice(initProvisionState(null), last);
    expect([s.agentId, s.templateId]).toEqual(['a1', 't1']);
    const existing = withLastChoice(initProvisionState({ ...failedNode, hypervisorId: null, templateId: 't9' }), last);
    expect(existing.templateId).toBe('t9');
    store.set('trellis.provision.last', 'not json');
    expect(loadLastChoice(storage)).toEqual({});
  });

  it('copies ssh user@ip with the template’s cloud-init user', () => {
    const templates = [template({ cloneDefaults: { ciUser: 'debian' } }), template({ id: 't2' })];
    expect(sshCommand({ ipAddress: '10.0.0.5', templateId: 't1' }, templates)).toBe('ssh debian@10.0.0.5');
    expect(sshCommand({ ipAddress: '10.0.0.5', templateId: 't2' }, templates)).toBe('ssh 10.0.0.5');
    // a user chosen for this node at provision time wins over the template's
    const provision = { type: 'provision', params: { name: 'web-1', clone_options: { ci_user: 'ops' } } };
    expect(sshCommand({ ipAddress: '10.0.0.5', templateId: 't1' }, templates, provision)).toBe('ssh ops@10.0.0.5');
    expect(sshCommand({ ipAddress: '10.0.0.5', templateId: 't2' }, templates, provision)).toBe('ssh ops@10.0.0.5');
    // another last command (a power action) says nothing about the user: the template's
    expect(sshCommand({ ipAddress: '10.0.0.5', templateId: 't1' }, templates, { type: 'vm_power', params: { action: 'start' } })).toBe('ssh debian@10.0.0.5');
  });
});

describe('review summary of the clone options', () => {
  it('is empty for Proxmox defaults and lists exactly what is sent otherwise', () => {
    expect(cloneSummary(EMPTY_CLONE)).toEqual([]);
    const s = cloneSummary({
      ...EMPTY_CLONE,
      storage: 'fast-ssd',
      diskSizeGib: '32',
      vmId: '4242',
      ciUser: 'debian',
      sshKeys: KEY,
      ipMode: 'static',
      ipAddress: '10.0.0.5/24',
      gateway: '10.0.0.1',
      vlanTag: '42',
      pool: 'web',
      tags: 'Prod, web',
      onboot: true,
    });
    const by = Object.fromEntries(s.map((i) => [i.field, i.value]));
    expect(by).toEqual({
      storage: 'fast-ssd',
      cloneMode: 'Full clone (a target storage needs one)',
      diskSizeGib: '32 GiB (grown after the clone if the template’s disk is smaller)',
      vmId: '4242',
      ciUser: 'debian',
      sshKeys: '1 key: me@host',
      ipAddress: '10.0.0.5/24, gateway 10.0.0.1',
      vlanTag: '42',
      pool: 'web',
      tags: 'prod, web',
      onboot: 'Yes',
    });
    expect(cloneSummary({ ...EMPTY_CLONE, cloneMode: 'linked', ipMode: 'dhcp' }).map((i) => i.value)).toEqual(['Linked clone', 'DHCP']);
  });
});
