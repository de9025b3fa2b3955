import { describe, expect, it } from 'vitest';
import { NODE_STATUSES, type CommandStatus, type NodeStatus, type VmNode } from '../lib/types';
import {
  actionAvailability,
  commandActivity,
  destroyConfirmHint,
  destroyConfirmed,
  hasLiveVm,
  nodeBusy,
  nodeSizeText,
  powerActions,
  type NodeAction,
} from './nodeActions';

type N = Pick<VmNode, 'status' | 'vmId' | 'lastCommandId'>;
const node = (status: NodeStatus, over: Partial<N> = {}): N => ({ status, vmId: 101, lastCommandId: 'c1', ...over });

/** The actions offered (enabled or not) for a node, in a fixed order. */
const offered = (n: N, cmd?: CommandStatus) =>
  (['provision', 'start', 'shutdown', 'stop', 'reboot', 'destroy', 'forget', 'delete'] as NodeAction[]).filter(
    (a) => actionAvailability(n, a, cmd).offered,
  );

describe('actions offered by status (node with a VM, idle)', () => {
  it.each<[NodeStatus, NodeAction[]]>([
    ['running', ['shutdown', 'stop', 'reboot', 'destroy', 'forget']],
    ['stopped', ['start', 'destroy', 'forget']],
    ['failed', ['start', 'stop', 'destroy', 'forget']],
    ['missing', ['destroy', 'delete']],
    ['destroyed', ['delete']],
    ['provisioning', []],
    ['destroying', []],
  ])('%s → %j', (status, expected) => {
    expect(offered(node(status), 'succeeded')).toEqual(expected);
  });

  it('every status is classified (no action throws, transitional ones offer nothing)', () => {
    for (const s of NODE_STATUSES) expect(() => offered(node(s))).not.toThrow();
  });
});

describe('actions of a node without a VM', () => {
  it('an unprovisioned node offers Provision and Delete only', () => {
    expect(offered(node('pending_provision', { vmId: null, lastCommandId: null }))).toEqual(['provision', 'delete']);
  });
  it('a failed provision that left no VM offers Provision again, and Delete', () => {
    expect(offered(node('failed', { vmId: null }), 'failed')).toEqual(['provision', 'delete']);
  });
  it('a failed provision whose VM was kept offers power, Destroy and Forget, not Provision or Delete', () => {
    expect(offered(node('failed'), 'failed')).toEqual(['start', 'stop', 'destroy', 'forget']);
  });
});

describe('a running command disables every action', () => {
  it('the last command still running makes a running node busy', () => {
    for (const st of ['queued', 'dispatched', 'running'] as CommandStatus[]) {
      expect(nodeBusy(node('running'), st)).toBe(true);
      const r = actionAvailability(node('running'), 'stop', st);
      expect(r.offered).toBe(true);
      expect(r.reason).toMatch(/Wait/);
      expect(actionAvailability(node('running'), 'destroy', st).reason).toMatch(/Wait/);
      expect(actionAvailability(node('running'), 'forget', st).reason).toMatch(/Wait/);
    }
  });
  it('a terminal or unknown last command leaves the node idle', () => {
    for (const st of ['succeeded', 'failed', 'cancelled', 'timed_out', undefined, null] as const) {
      expect(nodeBusy(node('stopped'), st)).toBe(false);
      expect(actionAvailability(node('stopped'), 'start', st)).toEqual({ offered: true, reason: null });
    }
  });
  it('provisioning and destroying are busy whatever the command says', () => {
    expect(nodeBusy(node('provisioning'), 'succeeded')).toBe(true);
    expect(nodeBusy(node('destroying', { lastCommandId: null }), undefined)).toBe(true);
  });
});

describe('live VM and power menu', () => {
  it('destroyed and missing VMs are not live', () => {
    expect(hasLiveVm(node('running'))).toBe(true);
    expect(hasLiveVm(node('failed'))).toBe(true);
    expect(hasLiveVm(node('destroyed'))).toBe(false);
    expect(hasLiveVm(node('missing'))).toBe(false);
    expect(hasLiveVm(node('pending_provision', { vmId: null }))).toBe(false);
  });
  it('powerActions lists the power actions in menu order', () => {
    expect(powerActions(node('running'))).toEqual(['shutdown', 'stop', 'reboot']);
    expect(powerActions(node('stopped'))).toEqual(['start']);
    expect(powerActions(node('stopped', { vmId: null }))).toEqual([]);
  });
  it('the activity label names what the running command does', () => {
    expect(commandActivity({ type: 'vm_power', params: { action: 'stop' } }, 'running')).toBe('Stopping');
    expect(commandActivity({ type: 'vm_power', params: { action: 'start' } }, 'stopped')).toBe('Starting');
    expect(commandActivity({ type: 'vm_power', params: { action: 'bogus' } }, 'stopped')).toBe('Changing power state');
    expect(commandActivity(undefined, 'destroying')).toBe('Destroying');
    expect(commandActivity({ type: 'destroy', params: {} }, 'failed')).toBe('Destroying');
    expect(commandActivity(undefined, 'running')).toBe('Working');
  });
});

describe('destroy confirmation', () => {
  it('only the exact node name enables Destroy', () => {
    expect(destroyConfirmed('web-1', 'web-1')).toBe(true);
    expect(destroyConfirmed('', 'web-1')).toBe(false);
    expect(destroyConfirmed('web-', 'web-1')).toBe(false);
    expect(destroyConfirmed(' web-1', 'web-1')).toBe(false);
    expect(destroyConfirmed('web-1 ', 'web-1')).toBe(false);
    expect(destroyConfirmed('WEB-1', 'web-1')).toBe(false);
    expect(destroyConfirmed('web-12', 'web-1')).toBe(false);
    expect(destroyConfirmed('', '')).toBe(false);
  });
  it('explains a mismatch, but not while the name is still being typed', () => {
    expect(destroyConfirmHint('', 'web-1')).toBeNull();
    expect(destroyConfirmHint('we', 'web-1')).toBeNull();
    expect(destroyConfirmHint('web-1', 'web-1')).toBeNull();
    expect(destroyConfirmHint('web-1 ', 'web-1')).toMatch(/spaces/);
    expect(destroyConfirmHint('Web-1', 'web-1')).toMatch(/case-sensitive/);
    expect(destroyConfirmHint('db-1', 'web-1')).toMatch(/does not match/);
  });
});

describe('node size', () => {
  const mem = (m: number) => `${m} MiB`;
  it('says unknown for an imported VM (0) instead of 0 MiB / 0 cores', () => {
    expect(nodeSizeText({ memory: 0, cores: 0 }, mem)).toBe('size unknown');
    expect(nodeSizeText({ memory: 2048, cores: 0 }, mem)).toBe('2048 MiB · cores unknown');
    expect(nodeSizeText({ memory: 0, cores: 1 }, mem)).toBe('memory unknown · 1 core');
    expect(nodeSizeText({ memory: 512, cores: 4 }, mem)).toBe('512 MiB · 4 cores');
  });
});
