import { describe, expect, it, vi } from 'vitest';
import { ApiError } from '../../lib/api';
import type { Agent, Command, Template, VmNode } from '../../lib/types';
import {
  initProvisionState,
  nextBlocker,
  provisionReducer,
  reachable,
  type Catalog,
  type ProvisionAction,
  type ProvisionState,
} from './provisionReducer';
import { retryProvision, submitProvision } from './provisionActions';

const agent = (over: Partial<Agent> = {}): Agent => ({
  id: 'a1',
  name: 'pve-1',
  status: 'online',
  lastHeartbeat: null,
  connectedAt: null,
  version: '0.1.0',
  hostname: 'pve-1',
  capabilities: ['provision', 'list_templates'],
  facts: {},
  maxConcurrency: 4,
  createdAt: '',
  ...over,
});

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

const vmNode = (over: Partial<VmNode> = {}): VmNode => ({
  id: 'n1',
  application: null,
  name: 'web-1',
  templateId: 't1',
  memory: 1024,
  cores: 1,
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

const catalog: Catalog = {
  agents: [agent(), agent({ id: 'a2', name: 'pve-2', status: 'offline' }), agent({ id: 'a3', name: 'tf-only', capabilities: ['terraform_apply'] })],
  templates: [template(), template({ id: 't2', name: 'unmapped', proxmoxTemplateId: null })],
};

const run = (s: ProvisionState, ...actions: ProvisionAction[]) => actions.reduce(provisionReducer, s);
const fresh = () => initProvisionState(null);
const validConfig = { name: 'web-2', memory: '1024', cores: '1', application: '' };

/** A new-node wizard walked up to the review step. */
function atReview(): ProvisionState {
  const s = run(
    fresh(),
    { type: 'selectAgent', agentId: 'a1' },
    { type: 'next', catalog },
    { type: 'selectTemplate', templateId: 't1' },
    { type: 'next', catalog },
    { type: 'setConfig', config: validConfig },
    { type: 'next', catalog },
  );
  expect(s.step).toBe('review');
  return s;
}

describe('initial state', () => {
  it('a new node starts on the hypervisor step with nothing chosen', () => {
    const s = fresh();
    expect(s).toMatchObject({ step: 'hypervisor', commandId: null, node: null, agentId: '', templateId: '', stepError: null });
    expect(s.config).toEqual({ name: '', memory: '', cores: '', application: '' });
  });

  it('an existing node pre-fills its settings', () => {
    const s = initProvisionState(vmNode({ hypervisorId: 'a1', application: 'billing' }));
    expect(s).toMatchObject({ step: 'hypervisor', agentId: 'a1', templateId: 't1' });
    expect(s.config).toEqual({ name: 'web-1', memory: '1024', cores: '1', application: 'billing' });
  });

  it('a provisioning or failed node opens on its command', () => {
    expect(initProvisionState(vmNode({ status: 'provisioning', lastCommandId: 'c1' }))).toMatchObject({ step: 'provisioning', commandId: 'c1' });
    expect(initProvisionState(vmNode({ status: 'failed', lastCommandId: 'c2' }))).toMatchObject({ step: 'provisioning', commandId: 'c2' });
  });
});

describe('Next is gated by validation', () => {
  it('hypervisor: none chosen, then an unusable one, then a usable one', () => {
    let s = run(fresh(), { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'hypervisor', stepError: 'Choose a hypervisor.' });
    s = run(s, { type: 'selectAgent', agentId: 'a2' }, { type: 'next', catalog });
    expect(s.step).toBe('hypervisor');
    expect(s.stepError).toMatch(/^pve-2: Offline/);
    s = run(s, { type: 'selectAgent', agentId: 'a3' }, { type: 'next', catalog });
    expect(s.stepError).toMatch(/no provision capability/);
    s = run(s, { type: 'selectAgent', agentId: 'a1' }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'template', stepError: null });
  });

  it('template: none chosen, then an unmapped one, then a mapped one', () => {
    let s = run(fresh(), { type: 'selectAgent', agentId: 'a1' }, { type: 'next', catalog }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'template', stepError: 'Choose a template.' });
    s = run(s, { type: 'selectTemplate', templateId: 't2' }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'template', stepError: 'unmapped is not mapped to a Proxmox template.' });
    s = run(s, { type: 'selectTemplate', templateId: 't1' }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'configure', stepError: null });
  });

  it('configure: invalid fields keep the step and reveal every error; fixed fields advance', () => {
    let s = run(fresh(), { type: 'selectAgent', agentId: 'a1' }, { type: 'next', catalog }, { type: 'selectTemplate', templateId: 't1' }, { type: 'next', catalog });
    expect(s.showAllErrors).toBe(false);
    s = run(s, { type: 'setConfig', config: { ...validConfig, memory: '8' } }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'configure', stepError: 'Fix the highlighted fields.', showAllErrors: true });
    expect(nextBlocker(s, catalog)).toBe('Fix the highlighted fields.');
    s = run(s, { type: 'setConfig', config: { ...validConfig, name: 'Not a DNS name!' } }, { type: 'next', catalog });
    expect(s.step).toBe('configure');
    s = run(s, { type: 'setConfig', config: validConfig }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'review', stepError: null });
  });

  it('a provisioned VM keeps its name: the name is not validated', () => {
    const s = run(
      initProvisionState(vmNode({ name: '', vmId: 101, hypervisorId: 'a1' })),
      { type: 'next', catalog },
      { type: 'next', catalog },
      { type: 'next', catalog },
    );
    expect(s.step).toBe('review');
  });

  it('Next does nothing on the review and provisioning steps', () => {
    const s = atReview();
    expect(provisionReducer(s, { type: 'next', catalog })).toBe(s);
    const p = initProvisionState(vmNode({ status: 'provisioning', lastCommandId: 'c1' }));
    expect(provisionReducer(p, { type: 'next', catalog })).toBe(p);
  });
});

describe('going back to a step', () => {
  it('Back walks one step at a time and clears the step error', () => {
    let s = run(atReview(), { type: 'back' });
    expect(s.step).toBe('configure');
    s = run(s, { type: 'setConfig', config: { ...validConfig, cores: '0' } }, { type: 'next', catalog });
    expect(s.stepError).not.toBeNull();
    s = run(s, { type: 'back' });
    expect(s).toMatchObject({ step: 'template', stepError: null });
    s = run(s, { type: 'back' }, { type: 'back' });
    expect(s.step).toBe('hypervisor');
    // Settings survive the way back.
    expect(s).toMatchObject({ agentId: 'a1', templateId: 't1' });
  });

  it('Back never leaves the provisioning step', () => {
    const p = initProvisionState(vmNode({ status: 'provisioning', lastCommandId: 'c1' }));
    expect(run(p, { type: 'back' }).step).toBe('provisioning');
  });

  it('the stepper jumps only to steps whose earlier steps are valid', () => {
    const s = fresh();
    expect(reachable(s, catalog, 'hypervisor')).toBe(true);
    expect(reachable(s, catalog, 'template')).toBe(false);
    expect(run(s, { type: 'goTo', step: 'review', catalog })).toBe(s);

    const chosen = run(s, { type: 'selectAgent', agentId: 'a1' }, { type: 'selectTemplate', templateId: 't1' });
    expect(reachable(chosen, catalog, 'configure')).toBe(true);
    expect(reachable(chosen, catalog, 'review')).toBe(false); // memory/cores still empty
    expect(run(chosen, { type: 'goTo', step: 'configure', catalog }).step).toBe('configure');

    const review = atReview();
    const back = run(review, { type: 'goTo', step: 'hypervisor', catalog });
    expect(back.step).toBe('hypervisor');
    expect(run(back, { type: 'goTo', step: 'review', catalog }).step).toBe('review');
    expect(reachable(review, catalog, 'provisioning')).toBe(false);
  });

  it('nothing is reachable while provisioning', () => {
    const p = initProvisionState(vmNode({ status: 'provisioning', lastCommandId: 'c1', hypervisorId: 'a1' }));
    expect(reachable(p, catalog, 'hypervisor')).toBe(false);
    expect(run(p, { type: 'goTo', step: 'hypervisor', catalog })).toBe(p);
  });
});

describe('lists arriving', () => {
  it('the only usable hypervisor is picked once', () => {
    const s = run(fresh(), { type: 'agentsLoaded', agents: catalog.agents });
    expect(s).toMatchObject({ agentId: 'a1', autoPicked: true });
    // Cleared by the user: not picked again on the next poll.
    const cleared = { ...s, agentId: '' };
    expect(provisionReducer(cleared, { type: 'agentsLoaded', agents: catalog.agents })).toBe(cleared);
  });

  it('no pick with two usable hypervisors, a selection, or on another step', () => {
    const two = [agent(), agent({ id: 'a4', name: 'pve-4' })];
    const s = fresh();
    expect(provisionReducer(s, { type: 'agentsLoaded', agents: two })).toBe(s);
    const chosen = run(s, { type: 'selectAgent', agentId: 'a2' });
    expect(provisionReducer(chosen, { type: 'agentsLoaded', agents: catalog.agents })).toBe(chosen);
    const p = initProvisionState(vmNode({ status: 'provisioning', lastCommandId: 'c1' }));
    expect(provisionReducer(p, { type: 'agentsLoaded', agents: catalog.agents })).toBe(p);
  });

  it('template defaults fill only empty memory/cores, and only for the chosen template', () => {
    let s = run(fresh(), { type: 'selectTemplate', templateId: 't1' });
    expect(run(s, { type: 'templateDefaults', template: template({ id: 't2' }) })).toBe(s);
    s = run(s, { type: 'templateDefaults', template: template() });
    expect(s.config).toMatchObject({ memory: '2048', cores: '2' });
    // Repeated polls with the same template do not produce a new state.
    expect(provisionReducer(s, { type: 'templateDefaults', template: template() })).toBe(s);
    const edited = run(s, { type: 'setConfig', config: { ...s.config, memory: '512' } }, { type: 'templateDefaults', template: template() });
    expect(edited.config.memory).toBe('512');
  });
});

describe('submit, failure and "Change settings"', () => {
  it('submit moves to provisioning on the new command', () => {
    let s = run(atReview(), { type: 'submitStart' });
    expect(s).toMatchObject({ submitting: true, submitError: null });
    s = run(s, { type: 'submitFailed', error: 'boom' });
    expect(s).toMatchObject({ step: 'review', submitting: false, submitError: 'boom' });
    s = run(s, { type: 'submitStart' }, { type: 'nodeSaved', node: vmNode({ id: 'n9' }) }, { type: 'provisionStarted', commandId: 'c1' });
    expect(s).toMatchObject({ step: 'provisioning', commandId: 'c1', submitting: false });
    expect(s.node?.id).toBe('n9');
  });

  it('retry follows the new command; a refused retry shows its error', () => {
    let s = run(atReview(), { type: 'provisionStarted', commandId: 'c1' }, { type: 'retryStart' });
    expect(s.retrying).toBe(true);
    s = run(s, { type: 'retryFailed', error: 'nope' });
    expect(s).toMatchObject({ retrying: false, retryError: 'nope', commandId: 'c1' });
    s = run(s, { type: 'retryStart' }, { type: 'retryStarted', commandId: 'c2' });
    expect(s).toMatchObject({ retrying: false, retryError: null, commandId: 'c2', step: 'provisioning' });
  });

  it('"Change settings" returns to the first step with the settings kept, and the wizard can go through again', () => {
    let s = run(atReview(), { type: 'nodeSaved', node: vmNode({ id: 'n9', name: 'web-2' }) }, { type: 'provisionStarted', commandId: 'c1' }, { type: 'retryFailed', error: 'x' });
    s = run(s, { type: 'changeSettings' });
    expect(s).toMatchObject({ step: 'hypervisor', commandId: null, retryError: null, agentId: 'a1', templateId: 't1' });
    expect(s.config).toEqual(validConfig);
    expect(s.node?.id).toBe('n9'); // the next submit re-provisions the same node
    expect(reachable(s, catalog, 'review')).toBe(true);
    s = run(s, { type: 'selectAgent', agentId: 'a2' }, { type: 'next', catalog });
    expect(s.step).toBe('hypervisor'); // still validated
  });

  it('"Keep the VM if provisioning fails" is off by default and survives steps and "Change settings"', () => {
    expect(fresh().keepOnFailure).toBe(false);
    let s = run(atReview(), { type: 'back' }, { type: 'setKeepOnFailure', keep: true }, { type: 'next', catalog });
    expect(s).toMatchObject({ step: 'review', keepOnFailure: true });
    s = run(s, { type: 'provisionStarted', commandId: 'c1' }, { type: 'changeSettings' });
    expect(s.keepOnFailure).toBe(true);
    expect(run(s, { type: 'setKeepOnFailure', keep: false }).keepOnFailure).toBe(false);
  });

  it('"Change settings" is ignored outside the provisioning step', () => {
    const s = atReview();
    expect(provisionReducer(s, { type: 'changeSettings' })).toBe(s);
  });
});

describe('submitProvision / retryProvision', () => {
  const cmd = { id: 'c1', agentId: 'a1' } as Command;

  function fakes() {
    return {
      createNode: vi.fn(async () => ({ node: vmNode({ id: 'n9', name: 'web-2' }), commandId: 'c1' as string | null })),
      updateNode: vi.fn(async () => vmNode()),
      provisionNode: vi.fn(async () => ({ node: vmNode(), commandId: 'c2' })),
      retryCommand: vi.fn(async () => ({ commandId: 'c3', status: 'queued' as const, attempt: 2 })),
    };
  }

  it('a new node is created with the provision request and the wizard follows its command', async () => {
    const m = fakes();
    const seen: ProvisionAction[] = [];
    const created = vi.fn();
    await submitProvision({ ...atReview(), config: { ...validConfig, name: ' web-2 ', application: ' billing ' } }, catalog, m, (a) => seen.push(a), created);
    expect(m.createNode).toHaveBeenCalledWith({ name: 'web-2', templateId: 't1', memory: 1024, cores: 1, application: 'billing', provision: { agentId: 'a1', keepOnFailure: false } });
    expect(m.provisionNode).not.toHaveBeenCalled();
    expect(created).toHaveBeenCalledWith(expect.objectContaining({ id: 'n9' }));
    expect(seen.map((a) => a.type)).toEqual(['submitStart', 'nodeSaved', 'provisionStarted']);
    expect(run(atReview(), ...seen)).toMatchObject({ step: 'provisioning', commandId: 'c1', node: { id: 'n9' } });
  });

  it('an existing node saves changed settings, then provisions on the chosen Proxmox node', async () => {
    const m = fakes();
    const seen: ProvisionAction[] = [];
    const s: ProvisionState = { ...atReview(), node: vmNode(), targetNode: 'pve2' };
    await submitProvision(s, catalog, m, (a) => seen.push(a));
    expect(m.updateNode).toHaveBeenCalledWith('n1', { name: 'web-2', memory: 1024, cores: 1, templateId: 't1' });
    expect(m.provisionNode).toHaveBeenCalledWith('n1', { agentId: 'a1', keepOnFailure: false, targetNode: 'pve2' });
    expect(seen.at(-1)).toEqual({ type: 'provisionStarted', commandId: 'c2' });
  });

  it('keepOnFailure goes with the provision request, on submit and on retry', async () => {
    const m = fakes();
    await submitProvision({ ...atReview(), keepOnFailure: true }, catalog, m, () => undefined);
    expect(m.createNode).toHaveBeenCalledWith(expect.objectContaining({ provision: { agentId: 'a1', keepOnFailure: true } }));
    const s: ProvisionState = { ...atReview(), node: vmNode(), step: 'provisioning', commandId: 'c1', keepOnFailure: true, targetNode: 'pve2' };
    // Retry is a retry of the failed command (same parameters, the next attempt)…
    const seen: ProvisionAction[] = [];
    await retryProvision(s, cmd, m, (a) => seen.push(a));
    expect(m.retryCommand).toHaveBeenCalledWith('c1');
    expect(m.provisionNode).not.toHaveBeenCalled();
    expect(seen.at(-1)).toEqual({ type: 'retryStarted', commandId: 'c3' });
    // …and only when the node has moved on is it provisioned afresh with the wizard's settings.
    m.retryCommand.mockRejectedValueOnce(new ApiError(409, 'not_retryable', 'the node has moved on'));
    await retryProvision(s, cmd, m, (a) => seen.push(a));
    expect(m.provisionNode).toHaveBeenCalledWith('n1', { agentId: 'a1', keepOnFailure: true, targetNode: 'pve2' });
    expect(seen.at(-1)).toEqual({ type: 'retryStarted', commandId: 'c2' });
  });

  it('an offline hypervisor or a refused request is reported on the review step', async () => {
    const m = fakes();
    const seen: ProvisionAction[] = [];
    const offline = { ...catalog, agents: [agent({ status: 'offline' })] };
    await submitProvision(atReview(), offline, m, (a) => seen.push(a));
    expect(m.createNode).not.toHaveBeenCalled();
    expect(seen).toEqual([{ type: 'submitFailed', error: 'pve-1 went offline. Choose another hypervisor or wait for it to reconnect.' }]);

    seen.length = 0;
    m.createNode.mockRejectedValueOnce(new ApiError(409, 'name_taken', 'Name in use'));
    await submitProvision(atReview(), catalog, m, (a) => seen.push(a));
    expect(seen).toEqual([{ type: 'submitStart' }, { type: 'submitFailed', error: 'Name in use (name_taken)' }]);
  });

  it('retry retries the failed command (next attempt), provisioning afresh only when the node moved on', async () => {
    const m = fakes();
    const seen: ProvisionAction[] = [];
    const s: ProvisionState = { ...atReview(), node: vmNode(), step: 'provisioning', commandId: 'c1' };
    await retryProvision(s, cmd, m, (a) => seen.push(a));
    expect(m.retryCommand).toHaveBeenCalledWith('c1');
    expect(m.provisionNode).not.toHaveBeenCalled();
    expect(seen).toEqual([{ type: 'retryStart' }, { type: 'retryStarted', commandId: 'c3' }]);

    seen.length = 0;
    m.retryCommand.mockRejectedValueOnce(new ApiError(409, 'not_retryable', 'the node has moved on'));
    await retryProvision(s, cmd, m, (a) => seen.push(a));
    expect(m.provisionNode).toHaveBeenCalledWith('n1', { agentId: 'a1', keepOnFailure: false });
    expect(seen.at(-1)).toEqual({ type: 'retryStarted', commandId: 'c2' });

    seen.length = 0;
    m.retryCommand.mockRejectedValueOnce(new ApiError(409, 'not_retryable', 'moved on'));
    m.provisionNode.mockRejectedValueOnce(new ApiError(409, 'busy', 'Node is busy'));
    await retryProvision(s, cmd, m, (a) => seen.push(a));
    expect(seen.at(-1)).toEqual({ type: 'retryFailed', error: 'Node is busy (busy)' });

    // Without a node (a command made directly) a refused retry is reported.
    seen.length = 0;
    m.retryCommand.mockRejectedValueOnce(new ApiError(409, 'not_retryable', 'only failed commands'));
    await retryProvision({ ...s, node: null }, cmd, m, (a) => seen.push(a));
    expect(seen.at(-1)).toEqual({ type: 'retryFailed', error: 'only failed commands (not_retryable)' });
  });
});
