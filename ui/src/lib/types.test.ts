import { describe, expect, it } from 'vitest';
import {
  COMMAND_STATUSES,
  NODE_STATUSES,
  TERMINAL_STATUSES,
  commandError,
  isCommandStatus,
  isTerminal,
  logStream,
} from './types';

describe('API status lists (checked against the generated enums at compile time)', () => {
  it('lists command statuses in life order and knows the terminal ones', () => {
    expect(COMMAND_STATUSES).toEqual(['queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out']);
    expect(TERMINAL_STATUSES).toEqual(['succeeded', 'failed', 'cancelled', 'timed_out']);
    expect(isTerminal('running')).toBe(false);
    expect(isTerminal('timed_out')).toBe(true);
    expect(isTerminal('toString')).toBe(false);
    expect(isTerminal(null)).toBe(false);
    expect(isCommandStatus('queued')).toBe(true);
    expect(isCommandStatus('nope')).toBe(false);
  });

  it('lists node statuses', () => {
    expect(NODE_STATUSES).toEqual(['pending_provision', 'provisioning', 'running', 'stopped', 'failed', 'destroying', 'destroyed', 'missing']);
  });
});

describe('untyped parts of the API', () => {
  it('reads a command error of the documented shape', () => {
    expect(commandError({ error: { code: 'proxmox_error', message: 'boom', retryable: true, stage: 'start_vm' } })).toEqual({
      code: 'proxmox_error',
      message: 'boom',
      retryable: true,
      stage: 'start_vm',
      details: undefined,
    });
    expect(commandError({ error: null })).toBeNull();
    expect(commandError({ error: 'oops' })).toBeNull();
    expect(commandError({})).toBeNull();
  });

  it('maps log streams', () => {
    expect(logStream('stderr')).toBe('stderr');
    expect(logStream(null)).toBe('stdout');
    expect(logStream('weird')).toBe('stdout');
  });
});
