import { useEffect, useRef, useState } from 'react';
import { useQuery, useQueryClient } from '@tanstack/react-query';
import { errorMessage } from '../../lib/api';
import { useLiveCommand } from '../../lib/hooks';
import { nodeAfterCommandQuery, nodeSettled, useAgent, useMutations } from '../../lib/queries';
import { commandPercent, failedStage, provisionOutcome, stageLabel } from '../../lib/stages';
import type { Command } from '../../lib/types';
import { commandError, isTerminal } from '../../lib/types';
import { ConfirmDialog } from '../../components/Modal';
import { CopyButton, ErrorBox, NodeStatusPill, Notice, ProgressBar, Spinner, StatusPill } from '../../components/ui';
import { StageList } from '../../components/StageList';
import { LogViewer } from '../../components/LogViewer';
import { cancelledSentence, vmCleanupSentence } from '../../lib/commandText';

/** Step 5: follows the provision command live (SSE, polling fallback); Retry or Change settings after a failure. */
export function StepProvisioning({
  commandId,
  nodeId,
  onNodeSettled,
  onRetry,
  onChangeSettings,
  retrying,
  retryError,
}: {
  commandId: string;
  nodeId: string | null;
  /** The node record reached its post-command state. */
  onNodeSettled: () => void;
  onRetry: (cmd: Command) => void;
  /** Back to the settings; the failed command says which setting was at fault, if one was. */
  onChangeSettings: (cmd: Command) => void;
  retrying: boolean;
  retryError: string | null;
}) {
  const live = useLiveCommand(commandId);
  const cmd = live.command;
  const m = useMutations();
  const [showLog, setShowLog] = useState(false);
  const [confirmCancel, setConfirmCancel] = useState(false);
  const [cancelErr, setCancelErr] = useState<string | null>(null);
  const agent = useAgent(cmd?.agentId);
  const status = cmd?.status;

  // After the command ends, the control plane updates the node; follow it until it settles.
  const qc = useQueryClient();
  const followQuery = nodeAfterCommandQuery(nodeId ?? '', commandId, !!nodeId && !!status && isTerminal(status));
  const follow = useQuery(followQuery);
  const node = follow.data ?? null;
  // dataUpdatedAt is read so every read of the node re-renders (and counts towards giving up).
  const reads = follow.dataUpdatedAt ? (qc.getQueryState(followQuery.queryKey)?.dataUpdateCount ?? 0) : 0;
  const settled = nodeSettled(follow.data, reads);
  const settledRef = useRef(onNodeSettled);
  useEffect(() => {
    settledRef.current = onNodeSettled;
  });
  useEffect(() => {
    if (settled) settledRef.current();
  }, [settled]);

  if (!cmd) {
    return live.error ? <ErrorBox title="Cannot load the provision command">{live.error}</ErrorBox> : <Spinner label="Loading command" />;
  }
  const out = provisionOutcome(cmd.result);
  const vmId = node?.vmId ?? out.vmId;
  const ip = node?.ipAddress ?? out.ip;
  const failed = isTerminal(cmd.status) && cmd.status !== 'succeeded';
  const cmdErr = commandError(cmd);
  const fstage = failed ? failedStage(cmd) : null;
  const percent = commandPercent(cmd);

  return (
    <div data-testid="provisioning-step" data-command-id={cmd.id} data-status={cmd.status}>
      <div className="prov-head">
        <StatusPill status={cmd.status} />
        <span className="muted small">
          on {agent?.name ?? 'hypervisor'} · attempt {cmd.attempt} ·{' '}
          <a href={`#/commands/${cmd.id}`} onClick={() => undefined}>
            command {cmd.id.slice(0, 8)}
          </a>
          {live.streamState === 'polling' && ' · polling'}
          {live.streamState === 'reconnecting' && ' · reconnecting…'}
        </span>
      </div>
      <ProgressBar label="Provisioning progress" percent={percent} tone={failed ? 'bad' : cmd.status === 'succeeded' ? 'ok' : 'info'} />
      <StageList type="provision" stages={cmd.stages ?? undefined} failed={fstage} />
      {cmd.status === 'queued' && <Notice>Waiting for the hypervisor to pick up the command…</Notice>}
      {cmd.status === 'succeeded' && (
        <div className="success-box" role="status" data-testid="provision-success">
          <strong>VM ready</strong>
          <div className="kv">
            <span className="kv-k">VM id</span>
            <span data-testid="result-vmid">{vmId ?? '–'}</span>
            <span className="kv-k">IP address</span>
            <span>
              <span data-testid="result-ip">{ip ?? 'not reported'}</span> {ip && <CopyButton text={ip} label="Copy" />}
            </span>
            {out.node && (
              <>
                <span className="kv-k">Proxmox node</span>
                <span>{out.node}</span>
              </>
            )}
            {node && (
              <>
                <span className="kv-k">Node status</span>
                <NodeStatusPill status={node.status} />
              </>
            )}
          </div>
        </div>
      )}
      {failed && (
        <div className={cmd.status === 'cancelled' ? 'errorbox errorbox-warn' : 'errorbox'} role={cmd.status === 'cancelled' ? 'status' : 'alert'} data-testid="provision-error">
          <strong>
            Provisioning {cmd.status === 'cancelled' ? 'was cancelled' : cmd.status === 'timed_out' ? 'timed out' : 'failed'}
            {fstage ? ` at “${stageLabel(fstage)}”` : ''}
          </strong>
          {cmd.status === 'cancelled' ? (
            <div data-testid="error-message">{cancelledSentence(cmd)}</div>
          ) : (
            cmdErr && (
              <div>
                <code className="err-code" data-testid="error-code">{cmdErr.code}</code> <span data-testid="error-message">{cmdErr.message}</span>
                {cmdErr.retryable && <span className="muted small"> (retryable)</span>}
              </div>
            )
          )}
          {vmCleanupSentence(cmd) && <div data-testid="vm-cleanup">{vmCleanupSentence(cmd)?.text}</div>}
          <div className="btn-row">
            <button type="button" className="btn btn-primary" onClick={() => onRetry(cmd)} disabled={retrying} data-testid="provision-retry">
              {retrying ? 'Retrying…' : 'Retry'}
            </button>
            <button type="button" className="btn" onClick={() => onChangeSettings(cmd)} data-testid="provision-change-settings">
              Change settings
            </button>
          </div>
          {retryError && <div className="field-error">{retryError}</div>}
        </div>
      )}
      {!isTerminal(cmd.status) && (
        <div className="btn-row">
          <span className="muted small">You can close this window; provisioning continues and can be reopened from the node.</span>
          <button type="button" className="btn btn-sm btn-danger-ghost" onClick={() => setConfirmCancel(true)} disabled={cmd.cancelRequested}>
            {cmd.cancelRequested ? 'Cancelling…' : 'Cancel provisioning'}
          </button>
        </div>
      )}
      <button type="button" className="btn btn-sm btn-ghost-dark" aria-expanded={showLog} onClick={() => setShowLog(!showLog)}>
        {showLog ? 'Hide agent log' : 'Show agent log'}
      </button>
      {showLog && <LogViewer buffer={live.logs} height={220} live={!isTerminal(cmd.status)} />}
      {confirmCancel && (
        <ConfirmDialog
          title="Cancel provisioning?"
          confirmLabel="Cancel provisioning"
          danger
          error={cancelErr}
          onCancel={() => setConfirmCancel(false)}
          onConfirm={async () => {
            try {
              await m.cancelCommand(cmd.id);
              setConfirmCancel(false);
              live.refresh();
            } catch (e) {
              setCancelErr(errorMessage(e));
            }
          }}
        >
          <p>The agent stops after the current step and removes the half-built VM.</p>
        </ConfirmDialog>
      )}
    </div>
  );
}
