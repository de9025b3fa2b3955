import { useState } from 'react';
import { errorMessage } from '../lib/api';
import { useLiveCommand, useNow } from '../lib/hooks';
import { useAgent, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { commandPercent, failedStage, stageLabel } from '../lib/stages';
import { commandError, isTerminal } from '../lib/types';
import { durationBetween, formatDuration, formatTimestamp } from '../lib/time';
import { ConfirmDialog } from '../components/Modal';
import { ErrorBox, JsonView, Notice, ProgressBar, RelTime, Spinner, StatusPill, shortId } from '../components/ui';
import { StageList } from '../components/StageList';
import { LogViewer } from '../components/LogViewer';
import { PinToggle } from '../components/PinToggle';
import { cancelledSentence, startedAt, targetLabel, vmCleanupSentence } from '../lib/commandText';
import { isDestroyPlan, planSummary } from '../lib/terraform';
import { PlanReview } from '../components/PlanReview';

const STREAM_LABEL: Record<string, string> = {
  connecting: 'connecting…',
  live: 'live',
  reconnecting: 'reconnecting…',
  polling: 'polling',
  ended: 'complete',
  error: 'stream error',
};

export function CommandPage({ id }: { id: string }) {
  const live = useLiveCommand(id);
  const cmd = live.command;
  const now = useNow(1000);
  const agent = useAgent(cmd?.agentId);
  const m = useMutations();
  const [confirmCancel, setConfirmCancel] = useState(false);
  const [actionErr, setActionErr] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [pinBusy, setPinBusy] = useState(false);

  if (!cmd) {
    return (
      <div className="page">
        <a href="#/commands" className="back">
          ← Commands
        </a>
        {live.error ? <ErrorBox title="Cannot load command">{live.error}</ErrorBox> : <Spinner />}
      </div>
    );
  }

  const terminal = isTerminal(cmd.status);
  const failed = isTerminal(cmd.status) && cmd.status !== 'succeeded';
  const cmdErr = commandError(cmd);
  const fstage = failed ? failedStage(cmd) : null;
  const cancelled = cmd.status === 'cancelled';
  const started = startedAt(cmd);
  const cleanup = vmCleanupSentence(cmd);
  const target = cmd.target;
  const targetText = targetLabel(cmd);
  // The node by name, linking to it in the nodes list; else the VM or workspace as text.
  const targetEl = target?.nodeName ? (
    <a href={`#/nodes?q=${encodeURIComponent(target.nodeName)}`} data-testid="command-target">
      {target.nodeName}
    </a>
  ) : targetText ? (
    <span data-testid="command-target">{targetText}</span>
  ) : null;

  const retry = async () => {
    setBusy(true);
    setActionErr(null);
    try {
      const r = await m.retryCommand(cmd.id);
      navigate(`/commands/${r.commandId}`);
    } catch (e) {
      setActionErr(errorMessage(e));
    } finally {
      setBusy(false);
    }
  };

  // Any status may be pinned: a running command pinned now is kept once it ends.
  const togglePin = async () => {
    setPinBusy(true);
    setActionErr(null);
    try {
      await (cmd.pinned ? m.unpinCommand(cmd.id) : m.pinCommand(cmd.id));
      live.refresh();
    } catch (e) {
      setActionErr(errorMessage(e));
    } finally {
      setPinBusy(false);
    }
  };

  return (
    <div className="page" data-testid="command-page" data-status={cmd.status}>
      <a href="#/commands" className="back">
        ← Commands
      </a>
      <header className="page-head">
        <div>
          <h1>
            {cmd.type} <span className="mono muted h-id">{shortId(cmd.id)}</span> <StatusPill status={cmd.status} />
          </h1>
          <p className="muted small">
            {targetEl && (
              <>
                for {target?.nodeName ? 'node ' : ''}
                {targetEl}
                {target?.nodeName && target.vmId != null ? ` (VM ${target.vmId})` : ''} ·{' '}
              </>
            )}
            on <a href={`#/commands?agentId=${encodeURIComponent(cmd.agentId)}`}>{agent?.name ?? shortId(cmd.agentId)}</a> · <span data-testid="command-attempt">attempt {cmd.attempt}</span>
            {cmd.retryOf && (
              <>
                {' '}
                · retry of <a href={`#/commands/${cmd.retryOf}`}>{shortId(cmd.retryOf)}</a>
              </>
            )}
            {cmd.createdBy && <> · by {cmd.createdBy}</>} · stream <span data-testid="stream-state">{STREAM_LABEL[live.streamState]}</span>
          </p>
        </div>
        <div className="btn-row">
          {!terminal && (
            <button type="button" className="btn btn-danger-ghost" onClick={() => setConfirmCancel(true)} disabled={cmd.cancelRequested} data-testid="cancel-command">
              {cmd.cancelRequested ? 'Cancelling…' : 'Cancel'}
            </button>
          )}
          {terminal && cmd.status !== 'succeeded' && (
            <button type="button" className="btn btn-primary" onClick={retry} disabled={busy} data-testid="retry-command">
              {busy ? 'Retrying…' : 'Retry'}
            </button>
          )}
          <PinToggle pinned={cmd.pinned} busy={pinBusy} onToggle={togglePin} />
        </div>
      </header>
      {actionErr && <ErrorBox>{actionErr}</ErrorBox>}
      <div className="cmd-grid">
        <section className="card">
          <h2>Progress</h2>
          <ProgressBar label="Command progress" percent={commandPercent(cmd)} tone={failed && !cancelled ? 'bad' : cmd.status === 'succeeded' ? 'ok' : 'info'} />
          {cmd.stage && !terminal && <p className="small">Current stage: {stageLabel(cmd.stage)}</p>}
          <StageList type={cmd.type} stages={cmd.stages ?? undefined} failed={fstage} />
        </section>
        <section className="card">
          <h2>Details</h2>
          <dl className="review compact">
            <dt>Created</dt>
            <dd title={formatTimestamp(cmd.createdAt)}>
              <RelTime ts={cmd.createdAt} now={now} />
            </dd>
            <dt>Dispatched</dt>
            <dd>{cmd.dispatchedAt ? <RelTime ts={cmd.dispatchedAt} now={now} /> : '–'}</dd>
            <dt>Started</dt>
            <dd data-testid="command-started">{started ? <RelTime ts={started} now={now} /> : '–'}</dd>
            <dt>Finished</dt>
            <dd>{cmd.finishedAt ? <RelTime ts={cmd.finishedAt} now={now} /> : '–'}</dd>
            <dt>Duration</dt>
            <dd>{started ? formatDuration(durationBetween(started, cmd.finishedAt, now)) : '–'}</dd>
            <dt>Deadline</dt>
            <dd>{cmd.deadlineAt ? formatTimestamp(cmd.deadlineAt) : '–'}</dd>
            {targetEl && (
              <>
                <dt>Target</dt>
                <dd>
                  {targetEl}
                  {target?.nodeName && target.vmId != null ? <span className="muted"> · VM {target.vmId}{target.proxmoxNode ? ` on ${target.proxmoxNode}` : ''}</span> : null}
                </dd>
              </>
            )}
            <dt>Id</dt>
            <dd className="mono small">{cmd.id}</dd>
            {cmd.idempotencyKey && (
              <>
                <dt>Idempotency key</dt>
                <dd className="mono small">{cmd.idempotencyKey}</dd>
              </>
            )}
          </dl>
        </section>
      </div>
      {cmd.status === 'queued' && <Notice>Queued: waiting for the agent to be online and have a free slot.</Notice>}
      {cancelled ? (
        // Cancelled is its own, neutral outcome: one sentence, not a red failure.
        <div className="notice notice-info" role="status" data-testid="command-cancelled">
          <strong>{cancelledSentence(cmd)}</strong>
          {cleanup && <div data-testid="vm-cleanup">{cleanup.text}</div>}
        </div>
      ) : (
        cmdErr && (
          <div className="errorbox" role="alert" data-testid="command-error">
            <strong>
              {cmd.status === 'timed_out' ? 'Timed out' : 'Failed'}
              {fstage ? ` at “${stageLabel(fstage)}”` : ''}
            </strong>
            <div>
              <code className="err-code">{cmdErr.code}</code> {cmdErr.message}
              {cmdErr.retryable && <span className="muted small"> (retryable)</span>}
            </div>
            {cleanup && (
              <div className={cleanup.tone === 'warn' ? 'vm-cleanup vm-cleanup-warn' : 'vm-cleanup'} data-testid="vm-cleanup">
                {cleanup.text}
              </div>
            )}
            {cmdErr.details != null && <JsonView value={cmdErr.details} />}
          </div>
        )
      )}
      {cmd.type === 'terraform_plan' && planSummary(cmd.result) && (
        <section className="card" data-testid="command-plan">
          <h2>{isDestroyPlan(cmd) ? 'Destroy plan' : 'Plan'}</h2>
          <PlanReview summary={planSummary(cmd.result)!} />
          <p>
            <a href={`#/deploy?plan=${encodeURIComponent(cmd.id)}`}>Review it on the Deploy page</a> to {isDestroyPlan(cmd) ? 'approve the destroy' : 'apply it'} or discard it.
          </p>
        </section>
      )}
      {cmd.result != null && (
        <section className="card">
          <h2>Result</h2>
          <JsonView value={cmd.result} />
        </section>
      )}
      <section className="card card-flush">
        <h2 className="card-pad">Log</h2>
        <LogViewer buffer={live.logs} height={480} live={!terminal} fileName={`${cmd.type}-${cmd.id}.log`} commandId={cmd.id} popoutHref={`#/commands/${encodeURIComponent(cmd.id)}/log`} />
      </section>
      <details className="card">
        <summary>Parameters</summary>
        <JsonView value={cmd.params} />
      </details>
      {confirmCancel && (
        <ConfirmDialog
          title="Cancel this command?"
          confirmLabel="Cancel command"
          danger
          error={actionErr}
          onCancel={() => setConfirmCancel(false)}
          onConfirm={async () => {
            try {
              await m.cancelCommand(cmd.id);
              setConfirmCancel(false);
              live.refresh();
            } catch (e) {
              setActionErr(errorMessage(e));
            }
          }}
        >
          <p>The agent is asked to stop (terraform gets SIGINT, then is killed after a grace period).</p>
        </ConfirmDialog>
      )}
    </div>
  );
}
