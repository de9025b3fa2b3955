import { useState } from 'react';
import { errorMessage } from '../lib/api';
import { useNow } from '../lib/hooks';
import { useAgents, useCommands } from '../lib/queries';
import { navigate, setQuery } from '../lib/router';
import { COMMAND_STATUSES, COMMAND_TYPES, commandError, isCommandStatus, type Command } from '../lib/types';
import { commandPercent, stageLabel } from '../lib/stages';
import { durationBetween, formatDuration } from '../lib/time';
import { Empty, ErrorBox, RelTime, Spinner, StatusPill, shortId } from '../components/ui';
import { targetLabel } from '../lib/commandText';

const PAGE = 100;

/** The Target cell: the node by name (with its VM), else the VM or Terraform workspace. */
function TargetCell({ c }: { c: Command }) {
  const label = targetLabel(c);
  if (!label) return <span className="muted">–</span>;
  const t = c.target;
  return (
    <span data-testid="command-target">
      {label}
      {t?.nodeName && t.vmId != null && <span className="muted small"> · VM {t.vmId}</span>}
    </span>
  );
}

function errorTitle(c: Command): string | undefined {
  const e = commandError(c);
  return e ? `${e.code}: ${e.message}` : undefined;
}

export function Commands({ query }: { query: URLSearchParams }) {
  const rawStatus = query.get('status');
  const status = isCommandStatus(rawStatus) ? rawStatus : '';
  const type = query.get('type') ?? '';
  const agentId = query.get('agentId') ?? '';
  const [auto, setAuto] = useState(true);
  const [limit, setLimit] = useState(PAGE);
  const now = useNow(1000);
  const list = useCommands({ status, type, agentId, limit }, auto);
  const agents = useAgents();
  const agentName = (id: string) => agents.data?.find((a) => a.id === id)?.name ?? shortId(id);
  const items: Command[] = list.data ?? [];
  const update = (p: Record<string, string>) => setQuery('/commands', { status, type, agentId, ...p });

  return (
    <div className="page">
      <header className="page-head">
        <div>
          <h1>Commands</h1>
          <p className="muted">Everything the agents were asked to do, newest first.</p>
        </div>
        <label className="toggle">
          <input type="checkbox" checked={auto} onChange={(e) => setAuto(e.target.checked)} /> Auto-refresh
        </label>
      </header>
      <div className="toolbar toolbar-wrap">
        <div className="chips" role="group" aria-label="Filter by status">
          <button type="button" className={`chip ${status === '' ? 'chip-on' : ''}`} aria-pressed={status === ''} onClick={() => update({ status: '' })}>
            All
          </button>
          {COMMAND_STATUSES.map((s) => (
            <button
              key={s}
              type="button"
              className={`chip chip-${s} ${status === s ? 'chip-on' : ''}`}
              aria-pressed={status === s}
              onClick={() => update({ status: status === s ? '' : s })}
            >
              {s.replace('_', ' ')}
            </button>
          ))}
        </div>
        <label className="inline-field">
          Type{' '}
          <select value={type} onChange={(e) => update({ type: e.target.value })} data-testid="type-filter">
            <option value="">all</option>
            {COMMAND_TYPES.map((t) => (
              <option key={t} value={t}>
                {t}
              </option>
            ))}
          </select>
        </label>
        <label className="inline-field">
          Agent{' '}
          <select value={agentId} onChange={(e) => update({ agentId: e.target.value })}>
            <option value="">all</option>
            {(agents.data ?? []).map((a) => (
              <option key={a.id} value={a.id}>
                {a.name}
              </option>
            ))}
          </select>
        </label>
      </div>
      {list.error && <ErrorBox title="Could not load commands">{errorMessage(list.error)}</ErrorBox>}
      {list.isPending ? (
        <Spinner />
      ) : items.length === 0 ? (
        <Empty>No commands match these filters.</Empty>
      ) : (
        <div className="table-wrap">
          <table className="table table-click table-stack" data-testid="commands-table">
            <thead>
              <tr>
                <th>Command</th>
                <th>Type</th>
                <th>Target</th>
                <th>Status</th>
                <th className="hide-sm">Agent</th>
                <th className="hide-md">Stage</th>
                <th className="hide-sm">Progress</th>
                <th className="hide-md">Attempt</th>
                <th>Created</th>
                <th className="hide-sm">Duration</th>
              </tr>
            </thead>
            <tbody>
              {items.map((c) => (
                <tr key={c.id} onClick={() => navigate(`/commands/${c.id}`)} data-command-id={c.id} data-status={c.status}>
                  <td data-label="Command">
                    <a href={`#/commands/${c.id}`} className="mono" onClick={(e) => e.stopPropagation()}>
                      {shortId(c.id)}
                    </a>
                  </td>
                  <td data-label="Type">{c.type}</td>
                  <td data-label="Target" style={{ overflowWrap: 'anywhere' }}>
                    <TargetCell c={c} />
                  </td>
                  <td data-label="Status">
                    <StatusPill status={c.status} title={errorTitle(c)} />
                  </td>
                  <td data-label="Agent" className="hide-sm">{agentName(c.agentId)}</td>
                  <td data-label="Stage" className="hide-md">{c.stage ? stageLabel(c.stage) : '–'}</td>
                  <td data-label="Progress" className="hide-sm">
                    <span
                      className="mini-bar"
                      role="progressbar"
                      aria-label="Progress"
                      aria-valuenow={commandPercent(c)}
                      aria-valuemin={0}
                      aria-valuemax={100}
                    >
                      <span style={{ width: `${commandPercent(c)}%` }} className={`mini-fill mini-${c.status}`} />
                    </span>
                  </td>
                  <td data-label="Attempt" className="hide-md">{c.attempt}</td>
                  <td data-label="Created" className="nowrap">
                    <RelTime ts={c.createdAt} now={now} />
                  </td>
                  <td data-label="Duration" className="hide-sm nowrap">{c.startedAt ? formatDuration(durationBetween(c.startedAt, c.finishedAt, now)) : '–'}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {items.length >= limit && (
        <div className="center">
          <button type="button" className="btn" onClick={() => setLimit(limit + PAGE)}>
            Show more
          </button>
        </div>
      )}
    </div>
  );
}
