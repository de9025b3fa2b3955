// The last step of a bulk provision: one row per node of the batch (stage, percent, VM id,
// IP, error), polled every 1.5 s while any node's command runs, and "Retry failed", which
// provisions the failed ones again (a new attempt of each failed command).
import { useState } from 'react';
import { useQuery, useQueryClient } from '@tanstack/react-query';
import { errorMessage } from '../../lib/api';
import { bulkApi, describeResults, gridRow, summarize, type GridRow } from '../../lib/bulk';
import { queryKeys } from '../../lib/queries';
import { ErrorBox, Notice, ProgressBar, Spinner } from '../../components/ui';

export const BATCH_POLL_MS = 1500;

const TONE: Record<GridRow['state'], 'ok' | 'bad' | 'info'> = { waiting: 'info', active: 'info', done: 'ok', failed: 'bad', other: 'info' };

export function ProvisionGrid({ batchId }: { batchId: string }) {
  const qc = useQueryClient();
  const q = useQuery({
    queryKey: ['batch', batchId],
    queryFn: ({ signal }) => bulkApi.batchNodes(batchId, signal),
    refetchInterval: (query) => (query.state.data && summarize(query.state.data.map(gridRow)).settled ? false : BATCH_POLL_MS),
  });
  const [retrying, setRetrying] = useState(false);
  const [retryMsg, setRetryMsg] = useState<{ text: string; bad: boolean } | null>(null);
  const rows = (q.data ?? []).map(gridRow);
  const sum = summarize(rows);

  const retryFailed = async () => {
    setRetrying(true);
    setRetryMsg(null);
    try {
      const r = await bulkApi.action(sum.failedIds, 'retry');
      setRetryMsg({ text: `Retry: ${describeResults(r)}`, bad: r.failed > 0 });
      await q.refetch();
      void qc.invalidateQueries({ queryKey: queryKeys.nodes });
    } catch (e) {
      setRetryMsg({ text: `Could not retry: ${errorMessage(e)}`, bad: true });
    } finally {
      setRetrying(false);
    }
  };

  if (q.isPending) return <Spinner label="Loading the batch" />;
  if (q.error && !q.data) return <ErrorBox title="Cannot load the batch">{errorMessage(q.error)}</ErrorBox>;

  return (
    <div data-testid="provision-grid" data-settled={sum.settled || undefined}>
      <p className="grid-summary" aria-live="polite" data-testid="grid-summary">
        {sum.total} nodes: {sum.done} running, {sum.active} provisioning, {sum.waiting} waiting, {sum.failed} failed
        {sum.settled ? ' — done.' : '…'}
      </p>
      <div className="table-wrap">
        <table className="table table-compact">
          <caption className="sr-only">Provisioning progress of each node</caption>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Stage</th>
              <th scope="col">Progress</th>
              <th scope="col">VM id</th>
              <th scope="col">IP</th>
              <th scope="col">Error</th>
            </tr>
          </thead>
          <tbody>
            {rows.map((r) => (
              <tr key={r.id} data-node-name={r.name} data-state={r.state}>
                <td className="nowrap">
                  <strong>{r.name}</strong>
                </td>
                <td className="nowrap" data-col="stage">
                  {r.label}
                  {r.attempt != null && r.attempt > 1 && <span className="muted small"> · attempt {r.attempt}</span>}
                </td>
                <td style={{ minWidth: '8rem' }}>
                  <ProgressBar percent={r.percent} tone={TONE[r.state]} label={`Progress of ${r.name}`} />
                </td>
                <td data-col="vmid">{r.vmId ?? '–'}</td>
                <td className="mono" data-col="ip">
                  {r.ip ?? '–'}
                </td>
                <td className={r.state === 'failed' ? 'err-text small' : 'warn-text small'} data-col="error">
                  {r.error ?? ''}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {q.error && <Notice tone="warn">Updating failed: {errorMessage(q.error)}; trying again.</Notice>}
      {retryMsg && (
        <div className={retryMsg.bad ? 'errorbox' : 'notice'} role="status" data-testid="grid-retry-result">
          {retryMsg.text}
        </div>
      )}
      <div className="btn-row" style={{ marginTop: '0.75rem' }}>
        <button
          type="button"
          className="btn btn-primary"
          onClick={() => void retryFailed()}
          disabled={sum.failed === 0 || retrying}
          data-testid="grid-retry-failed"
        >
          {retrying ? 'Retrying…' : `Retry failed (${sum.failed})`}
        </button>
      </div>
    </div>
  );
}
