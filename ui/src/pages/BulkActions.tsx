// The Nodes table's multi-select: a select-all header checkbox, and the bar of bulk actions
// (Start, Shutdown, Reboot, Stop, Destroy, Retry failed) over the selected nodes, with the
// per-node results of the last action. Destroy asks for confirmation listing the names.
import { useEffect, useRef, useState } from 'react';
import { useQueryClient } from '@tanstack/react-query';
import { errorMessage } from '../lib/api';
import { bulkApi, type BulkActionResults, type BulkNodeAction } from '../lib/bulk';
import { queryKeys } from '../lib/queries';
import type { VmNode } from '../lib/types';
import { ConfirmDialog } from '../components/Modal';

export function SelectAll({ shown, selected, onChange }: { shown: string[]; selected: ReadonlySet<string>; onChange: (next: Set<string>) => void }) {
  const ref = useRef<HTMLInputElement>(null);
  const picked = shown.filter((id) => selected.has(id)).length;
  const all = shown.length > 0 && picked === shown.length;
  useEffect(() => {
    if (ref.current) ref.current.indeterminate = picked > 0 && !all;
  }, [picked, all]);
  return (
    <input
      ref={ref}
      type="checkbox"
      aria-label="Select all shown nodes"
      checked={all}
      disabled={shown.length === 0}
      onChange={() => {
        const next = new Set(selected);
        for (const id of shown) {
          if (all) next.delete(id);
          else next.add(id);
        }
        onChange(next);
      }}
      data-testid="nodes-select-all"
    />
  );
}

const ACTIONS: { action: BulkNodeAction; label: string; danger?: boolean }[] = [
  { action: 'start', label: 'Start' },
  { action: 'shutdown', label: 'Shut down' },
  { action: 'reboot', label: 'Reboot' },
  { action: 'stop', label: 'Stop' },
  { action: 'retry', label: 'Retry failed' },
  { action: 'destroy', label: 'Destroy…', danger: true },
];

const DONE: Record<BulkNodeAction, string> = {
  start: 'start',
  shutdown: 'shut down',
  reboot: 'reboot',
  stop: 'stop',
  retry: 'retry',
  destroy: 'destroy',
};

export function BulkActionBar({ nodes, onClear }: { nodes: VmNode[]; onClear: () => void }) {
  const qc = useQueryClient();
  const [busy, setBusy] = useState<BulkNodeAction | null>(null);
  const [confirmDestroy, setConfirmDestroy] = useState(false);
  const [result, setResult] = useState<{ action: BulkNodeAction; r: BulkActionResults } | null>(null);
  const [error, setError] = useState<string | null>(null);

  const run = async (action: BulkNodeAction) => {
    setBusy(action);
    setError(null);
    setResult(null);
    try {
      const r = await bulkApi.action(
        nodes.map((n) => n.id),
        action,
        nodes.map((n) => n.name),
      );
      setResult({ action, r });
      setConfirmDestroy(false);
      void qc.invalidateQueries({ queryKey: queryKeys.nodes });
      void qc.invalidateQueries({ queryKey: queryKeys.commandLists });
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(null);
    }
  };

  const names = new Map(nodes.map((n) => [n.id, n.name]));
  return (
    <div className="bulk-bar" role="region" aria-label="Bulk actions" data-testid="bulk-bar">
      <div className="btn-row">
        <strong>{nodes.length} selected</strong>
        {ACTIONS.map((a) => (
          <button
            key={a.action}
            type="button"
            className={`btn btn-sm ${a.danger ? 'btn-danger-ghost' : ''}`}
            disabled={busy !== null || nodes.length === 0}
            onClick={() => (a.action === 'destroy' ? setConfirmDestroy(true) : void run(a.action))}
            data-testid={`bulk-${a.action}`}
          >
            {busy === a.action ? 'Working…' : a.label}
          </button>
        ))}
        <button type="button" className="btn btn-sm" onClick={onClear}>
          Clear selection
        </button>
      </div>
      {error && (
        <div className="errorbox" role="alert">
          {error}
        </div>
      )}
      {result && (
        <div role="status" className="bulk-results" data-testid="bulk-results">
          <p className="small">
            {DONE[result.action]}: {result.r.succeeded} started{result.r.failed > 0 ? `, ${result.r.failed} refused` : ''}
          </p>
          <ul className="small">
            {result.r.results.map((x) => (
              <li key={x.nodeId} data-node-id={x.nodeId} data-ok={x.commandId ? 'true' : 'false'}>
                <strong>{x.name ?? names.get(x.nodeId) ?? x.nodeId}</strong>:{' '}
                {x.commandId ? (
                  <a href={`#/commands/${x.commandId}`}>started</a>
                ) : (
                  <span className="err-text">
                    {x.error?.message} ({x.error?.code})
                  </span>
                )}
              </li>
            ))}
          </ul>
        </div>
      )}
      {confirmDestroy && (
        <ConfirmDialog
          title={`Destroy ${nodes.length} ${nodes.length === 1 ? 'VM' : 'VMs'}?`}
          confirmLabel={`Destroy ${nodes.length}`}
          danger
          busy={busy === 'destroy'}
          error={error}
          onCancel={() => setConfirmDestroy(false)}
          onConfirm={() => void run('destroy')}
        >
          <p>This stops and deletes these VMs with their disks in Proxmox. The node records stay as destroyed.</p>
          <ul data-testid="bulk-destroy-names">
            {nodes.map((n) => (
              <li key={n.id}>
                <strong>{n.name}</strong>
                {n.vmId != null ? ` (VM ${n.vmId})` : ' (no VM)'}
              </li>
            ))}
          </ul>
        </ConfirmDialog>
      )}
    </div>
  );
}
