// The Audit page's logic: its filters (kept in the URL's query) and how a row reads.
import type { AuditEntry } from './types';

export interface AuditFilters {
  actor: string;
  action: string;
  outcome: '' | 'success' | 'partial' | 'error';
}

export const AUDIT_PAGE = 50;

/** Action prefixes offered by the page's filter (the API matches any prefix). */
export const ACTION_PREFIXES = ['node.', 'template.', 'command.', 'agent.', 'admin.', 'auth.'] as const;

export function filtersFrom(query: URLSearchParams): AuditFilters {
  const outcome = query.get('outcome');
  return {
    actor: (query.get('actor') ?? '').trim(),
    action: (query.get('action') ?? '').trim(),
    outcome: outcome === 'success' || outcome === 'partial' || outcome === 'error' ? outcome : '',
  };
}

/** The query to send: empty filters are left out. */
export function auditParams(f: AuditFilters, before?: string) {
  return {
    actor: f.actor || undefined,
    action: f.action || undefined,
    outcome: f.outcome || undefined,
    limit: AUDIT_PAGE,
    before,
  };
}

/** "node aud-1", "command 1a2b3c4d", or "–". */
export function targetText(e: Pick<AuditEntry, 'targetType' | 'targetId' | 'targetName'>): string {
  const name = e.targetName ?? (e.targetId ? e.targetId.slice(0, 8) : null);
  if (!name) return e.targetType && e.targetType !== 'auth' ? e.targetType : '–';
  return e.targetType ? `${e.targetType} ${name}` : name;
}

/** "ok", "partial" (some nodes of a bulk request refused) or "409 invalid_state". */
export function outcomeText(e: Pick<AuditEntry, 'outcome' | 'status' | 'errorCode'>): string {
  if (e.outcome === 'success') return 'ok';
  if (e.outcome === 'partial') return 'partial: some refused';
  if (e.outcome === 'error' && e.status < 400) return 'error: all refused';
  return e.errorCode ? `${e.status} ${e.errorCode}` : String(e.status);
}
