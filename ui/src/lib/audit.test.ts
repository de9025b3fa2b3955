import { describe, expect, it } from 'vitest';
import { auditParams, filtersFrom, outcomeText, targetText } from './audit';

describe('audit filters', () => {
  it('reads the URL and drops unknown outcomes', () => {
    expect(filtersFrom(new URLSearchParams('actor=alice&action=node.&outcome=error'))).toEqual({
      actor: 'alice',
      action: 'node.',
      outcome: 'error',
    });
    expect(filtersFrom(new URLSearchParams('outcome=maybe')).outcome).toBe('');
  });

  it('sends only the filters that are set, with the cursor', () => {
    expect(auditParams({ actor: '', action: 'auth.', outcome: '' }, '12.ab')).toEqual({
      actor: undefined,
      action: 'auth.',
      outcome: undefined,
      limit: 50,
      before: '12.ab',
    });
  });
});

describe('audit rows', () => {
  it('names the target by name, else by short id', () => {
    expect(targetText({ targetType: 'node', targetId: 'x', targetName: 'web-1' })).toBe('node web-1');
    expect(targetText({ targetType: 'command', targetId: '1a2b3c4d5e6f', targetName: null })).toBe('command 1a2b3c4d');
    expect(targetText({ targetType: null, targetId: null, targetName: null })).toBe('–');
  });

  it('shows the status and code of a failure', () => {
    expect(outcomeText({ outcome: 'success', status: 202, errorCode: null })).toBe('ok');
    expect(outcomeText({ outcome: 'error', status: 409, errorCode: 'invalid_state' })).toBe('409 invalid_state');
    // a bulk request answered 200 whose nodes were refused
    expect(outcomeText({ outcome: 'partial', status: 200, errorCode: null })).toBe('partial: some refused');
    expect(outcomeText({ outcome: 'error', status: 200, errorCode: null })).toBe('error: all refused');
    expect(filtersFrom(new URLSearchParams('outcome=partial')).outcome).toBe('partial');
  });
});
