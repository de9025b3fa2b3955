import { useState } from 'react';
import { useInfiniteQuery } from '@tanstack/react-query';
import { api, errorMessage } from '../lib/api';
import { ACTION_PREFIXES, auditParams, filtersFrom, outcomeText, targetText, type AuditFilters } from '../lib/audit';
import { setQuery } from '../lib/router';
import { formatTimestamp } from '../lib/time';
import { Empty, ErrorBox, Spinner } from '../components/ui';

/** Who did what, when, with what outcome: newest first, "Load more" pages back. */
export function Audit({ query }: { query: URLSearchParams }) {
  const f = filtersFrom(query);
  const [actor, setActor] = useState(f.actor);
  const update = (p: Partial<AuditFilters>) => setQuery('/audit', { ...f, ...p });
  const list = useInfiniteQuery({
    queryKey: ['audit', f],
    queryFn: ({ pageParam, signal }) => api.listAudit(auditParams(f, pageParam), signal),
    initialPageParam: undefined as string | undefined,
    getNextPageParam: (last) => last.nextBefore ?? undefined,
  });
  const rows = list.data?.pages.flatMap((p) => p.items) ?? [];

  return (
    <div className="page">
      <header className="page-head">
        <div>
          <h1>Audit</h1>
          <p className="muted">Every change made through the API, sign-ins and refused credentials, newest first.</p>
        </div>
      </header>
      <form
        className="toolbar toolbar-wrap"
        role="search"
        aria-label="Filter the audit log"
        onSubmit={(e) => {
          e.preventDefault();
          update({ actor: actor.trim() });
        }}
      >
        <label className="inline-field">
          Who{' '}
          <input
            value={actor}
            onChange={(e) => setActor(e.target.value)}
            onBlur={() => actor.trim() !== f.actor && update({ actor: actor.trim() })}
            placeholder="admin name"
            data-testid="audit-actor"
          />
        </label>
        <label className="inline-field">
          Action{' '}
          <select value={f.action} onChange={(e) => update({ action: e.target.value })} data-testid="audit-action">
            <option value="">all</option>
            {ACTION_PREFIXES.map((a) => (
              <option key={a} value={a}>
                {a.slice(0, -1)}
              </option>
            ))}
          </select>
        </label>
        <label className="inline-field">
          Outcome{' '}
          <select
            value={f.outcome}
            onChange={(e) => update({ outcome: e.target.value as AuditFilters['outcome'] })}
            data-testid="audit-outcome"
          >
            <option value="">all</option>
            <option value="success">success</option>
            <option value="partial">partial</option>
            <option value="error">error</option>
          </select>
        </label>
        <button type="submit" className="btn btn-sm">
          Apply
        </button>
      </form>
      {list.error && <ErrorBox title="Could not load the audit log">{errorMessage(list.error)}</ErrorBox>}
      {list.isPending ? (
        <Spinner />
      ) : rows.length === 0 ? (
        <Empty>No audited actions match these filters.</Empty>
      ) : (
        <div className="table-wrap">
          <table className="table table-stack" data-testid="audit-table">
            <caption className="sr-only">Audit log</caption>
            <thead>
              <tr>
                <th scope="col">When</th>
                <th scope="col">Who</th>
                <th scope="col">Action</th>
                <th scope="col">Target</th>
                <th scope="col">Outcome</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((e) => (
                <tr key={e.id} data-testid="audit-row">
                  <td data-label="When">
                    <time dateTime={e.at}>{formatTimestamp(e.at)}</time>
                  </td>
                  <td data-label="Who">{e.actor}</td>
                  <td data-label="Action">
                    <code>{e.action}</code>
                  </td>
                  <td data-label="Target" title={e.targetId ?? undefined}>
                    {targetText(e)}
                  </td>
                  <td data-label="Outcome" className={e.outcome === 'error' ? 'audit-error' : undefined}>
                    {outcomeText(e)}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {list.hasNextPage && (
        <button
          type="button"
          className="btn"
          onClick={() => void list.fetchNextPage()}
          disabled={list.isFetchingNextPage}
          data-testid="audit-more"
        >
          {list.isFetchingNextPage ? 'Loading…' : 'Load more'}
        </button>
      )}
    </div>
  );
}
