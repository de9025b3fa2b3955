// The Deploy page after the form: a plan followed live, its review, then Apply (exactly that
// saved plan) or Discard; the apply followed live below it; and a workspace destroy followed
// live. Each run reuses the command page's parts: the live stream (useLiveCommand), the stage
// list, the progress bar and the log viewer.
import { useState, type ReactNode } from 'react';
import { errorMessage } from '../lib/api';
import { useLiveCommand, type LiveCommand } from '../lib/hooks';
import { useAgent, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { commandPercent, failedStage, stageLabel } from '../lib/stages';
import { UI_META, applyGate, planAgain, planErrorHint, planSummary } from '../lib/terraform';
import { commandError, isTerminal, type Command } from '../lib/types';
import { cancelledSentence } from '../lib/commandText';
import { ErrorBox, JsonView, Notice, ProgressBar, Spinner, StatusPill, shortId } from '../components/ui';
import { StageList } from '../components/StageList';
import { LogViewer } from '../components/LogViewer';
import { ConfirmDialog } from '../components/Modal';
import { PlanReview } from '../components/PlanReview';

/** Where the run happens and what it acts on: workspace, version, agent, who, the command. */
function RunMeta({ cmd }: { cmd: Command }) {
  const agent = useAgent(cmd.agentId);
  return (
    <p className="muted small" data-testid="run-meta">
      workspace <span className="mono" data-testid="run-workspace">{cmd.target?.workspace ?? '–'}</span>
      {cmd.target?.version && (
        <>
          {' '}
          at <span className="mono">{cmd.target.version}</span>
        </>
      )}{' '}
      · on {agent?.name ?? shortId(cmd.agentId)}
      {cmd.createdBy && <> · by {cmd.createdBy}</>} · command{' '}
      <a href={`#/commands/${encodeURIComponent(cmd.id)}`} className="mono">
        {shortId(cmd.id)}
      </a>
    </p>
  );
}

/** A finished run's error (or cancellation), with what to do for the Terraform plan codes. */
function RunOutcome({ cmd, action }: { cmd: Command; action?: ReactNode }) {
  if (cmd.status === 'cancelled') {
    return (
      <div className="notice notice-info" role="status" data-testid="run-cancelled">
        {cancelledSentence(cmd)}
      </div>
    );
  }
  const e = commandError(cmd);
  if (!isTerminal(cmd.status) || cmd.status === 'succeeded' || !e) return null;
  const stage = failedStage(cmd);
  const hint = planErrorHint(e.code);
  return (
    <div className="errorbox" role="alert" data-testid="run-error" data-code={e.code}>
      <strong>
        {cmd.status === 'timed_out' ? 'Timed out' : 'Failed'}
        {stage ? ` at “${stageLabel(stage)}”` : ''}
      </strong>
      <div>
        <code className="err-code">{e.code}</code> {e.message}
      </div>
      {hint && <div data-testid="run-error-hint">{hint}</div>}
      {action && <div className="btn-row">{action}</div>}
    </div>
  );
}

/** Progress and stages of a run, then its log. */
function RunProgress({ live, label }: { live: LiveCommand; label: string }) {
  const cmd = live.command;
  if (!cmd) return live.error ? <ErrorBox title={`Cannot load the ${label}`}>{live.error}</ErrorBox> : <Spinner />;
  const failed = isTerminal(cmd.status) && cmd.status !== 'succeeded';
  return (
    <>
      <ProgressBar label={`${label} progress`} percent={commandPercent(cmd)} tone={failed && cmd.status !== 'cancelled' ? 'bad' : cmd.status === 'succeeded' ? 'ok' : 'info'} />
      <StageList type={cmd.type} stages={cmd.stages ?? undefined} failed={failed ? failedStage(cmd) : null} />
      {cmd.status === 'queued' && <Notice>Queued: waiting for the agent to be online and have a free slot.</Notice>}
    </>
  );
}

function RunLog({ live, title }: { live: LiveCommand; title: string }) {
  const cmd = live.command;
  if (!cmd) return null;
  return (
    <section className="card card-flush" aria-label={title}>
      <h2 className="card-pad">{title}</h2>
      <LogViewer
        buffer={live.logs}
        height={320}
        live={!isTerminal(cmd.status)}
        fileName={`${cmd.type}-${cmd.id}.log`}
        commandId={cmd.id}
        popoutHref={`#/commands/${encodeURIComponent(cmd.id)}/log`}
      />
    </section>
  );
}

/** Plan → review → Apply or Discard, and the apply once started. */
export function PlanRun({ planId, applyId }: { planId: string; applyId: string | null }) {
  const plan = useLiveCommand(planId);
  const apply = useLiveCommand(applyId);
  const m = useMutations();
  const [busy, setBusy] = useState<'apply' | 'discard' | 'replan' | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [confirmCancel, setConfirmCancel] = useState(false);
  const [cancelErr, setCancelErr] = useState<string | null>(null);
  const cmd = plan.command;

  const act = (what: 'apply' | 'discard' | 'replan', fn: () => Promise<void>) => async () => {
    setBusy(what);
    setError(null);
    try {
      await fn();
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(null);
    }
  };

  if (!cmd) {
    return (
      <div className="page">
        <a href="#/deploy" className="back">
          ← Deploy
        </a>
        {plan.error ? <ErrorBox title="Cannot load the plan">{plan.error}</ErrorBox> : <Spinner />}
      </div>
    );
  }
  if (cmd.type !== 'terraform_plan') {
    return (
      <div className="page">
        <a href="#/deploy" className="back">
          ← Deploy
        </a>
        <ErrorBox title="Not a plan">
          Command {shortId(cmd.id)} is a {cmd.type}. <a href={`#/commands/${encodeURIComponent(cmd.id)}`}>Open it on its command page</a>.
        </ErrorBox>
      </div>
    );
  }

  const summary = cmd.status === 'succeeded' ? planSummary(cmd.result) : null;
  const gate = applyGate(cmd, !!applyId);
  const applyCmd = apply.command;
  const planEnded = isTerminal(cmd.status);

  const doApply = act('apply', async () => {
    // One apply per plan: a second click (or a reload and a click) answers with the same command.
    const r = await m.createCommand({
      agentId: cmd.agentId,
      type: 'terraform_apply',
      params: { plan_command_id: cmd.id, meta: UI_META },
      idempotencyKey: `ui-apply-of-plan-${cmd.id}`,
    });
    navigate(`/deploy?plan=${encodeURIComponent(cmd.id)}&apply=${encodeURIComponent(r.commandId)}`);
  });
  const doDiscard = act('discard', async () => {
    if (!planEnded) {
      try {
        await m.cancelCommand(cmd.id);
      } catch {
        /* it finished meanwhile: nothing to stop */
      }
    }
    navigate('/deploy');
  });
  const doReplan = act('replan', async () => {
    const id = await planAgain(m, cmd);
    navigate(`/deploy?plan=${encodeURIComponent(id)}`);
  });
  const replanButton = (
    <button type="button" className="btn" onClick={doReplan} disabled={busy !== null} data-testid="plan-again">
      {busy === 'replan' ? 'Planning…' : 'Plan again'}
    </button>
  );

  return (
    <div className="page" data-testid="plan-page" data-status={cmd.status}>
      <a href="#/deploy" className="back">
        ← Deploy
      </a>
      <header className="page-head">
        <div>
          <h1>
            {applyId ? 'Apply' : 'Review plan'} <StatusPill status={cmd.status} />
          </h1>
          <RunMeta cmd={cmd} />
        </div>
      </header>
      {error && <ErrorBox>{error}</ErrorBox>}

      <section className="card" aria-labelledby="plan-heading" data-testid="plan-card">
        <h2 id="plan-heading">Plan</h2>
        {summary ? <PlanReview summary={summary} /> : <RunProgress live={plan} label="Plan" />}
        <RunOutcome cmd={cmd} action={replanButton} />
        {!applyId && (
          <div className="btn-row plan-actions">
            <button
              type="button"
              className="btn btn-primary"
              onClick={doApply}
              disabled={!gate.ok || busy !== null}
              aria-describedby={gate.ok ? undefined : 'apply-why'}
              data-testid="plan-apply"
            >
              {busy === 'apply' ? 'Starting…' : 'Apply this plan'}
            </button>
            <button type="button" className="btn" onClick={doDiscard} disabled={busy !== null} data-testid="plan-discard">
              {busy === 'discard' ? 'Discarding…' : planEnded ? 'Discard' : 'Stop and discard'}
            </button>
            {summary && replanButton}
            {!gate.ok && (
              <span id="apply-why" className="muted small" data-testid="apply-why">
                {gate.reason}
              </span>
            )}
          </div>
        )}
        {!applyId && summary && gate.ok && (
          <p className="muted small">Apply runs exactly this saved plan on the agent that made it. It is refused if the workspace's state changed since; Discard leaves it unapplied (the agent deletes it after 24 hours).</p>
        )}
      </section>

      {applyId && (
        <section className="card" aria-labelledby="apply-heading" data-testid="apply-card" data-status={applyCmd?.status ?? 'loading'}>
          <h2 id="apply-heading">
            Apply {applyCmd && <StatusPill status={applyCmd.status} />}
          </h2>
          <RunProgress live={apply} label="Apply" />
          {applyCmd && !isTerminal(applyCmd.status) && (
            <div className="btn-row">
              <button type="button" className="btn btn-danger-ghost" onClick={() => setConfirmCancel(true)} disabled={applyCmd.cancelRequested} data-testid="apply-cancel">
                {applyCmd.cancelRequested ? 'Cancelling…' : 'Cancel apply'}
              </button>
            </div>
          )}
          {applyCmd && <RunOutcome cmd={applyCmd} action={replanButton} />}
          {applyCmd?.status === 'succeeded' && (
            <div className="success-box" role="status" data-testid="apply-succeeded">
              <strong>Applied.</strong> The plan's changes are made and the workspace's new state is stored by Trellis.
              <div className="btn-row">
                {replanButton}
                <a className="btn" href="#/deploy">
                  New deploy
                </a>
              </div>
            </div>
          )}
          {applyCmd?.status === 'succeeded' && applyCmd.result != null && (
            <details>
              <summary>Outputs</summary>
              <JsonView value={(applyCmd.result as { outputs?: unknown }).outputs ?? applyCmd.result} />
            </details>
          )}
        </section>
      )}
      {applyId && <RunLog live={apply} title="Apply log" />}
      <RunLog live={plan} title="Plan log" />
      {confirmCancel && applyCmd && (
        <ConfirmDialog
          title="Cancel this apply?"
          confirmLabel="Cancel apply"
          danger
          error={cancelErr}
          onCancel={() => setConfirmCancel(false)}
          onConfirm={async () => {
            try {
              await m.cancelCommand(applyCmd.id);
              setConfirmCancel(false);
              apply.refresh();
            } catch (e) {
              setCancelErr(errorMessage(e));
            }
          }}
        >
          <p>Terraform gets SIGINT and stops after the resource it is working on (it is killed after a grace period). What was applied so far stays, and is recorded in the workspace's state.</p>
        </ConfirmDialog>
      )}
    </div>
  );
}

/** A workspace destroy followed live. */
export function DestroyRun({ id }: { id: string }) {
  const live = useLiveCommand(id);
  const cmd = live.command;
  return (
    <div className="page" data-testid="destroy-page" data-status={cmd?.status ?? 'loading'}>
      <a href="#/deploy" className="back">
        ← Deploy
      </a>
      <header className="page-head">
        <div>
          <h1>Destroy {cmd && <StatusPill status={cmd.status} />}</h1>
          {cmd && <RunMeta cmd={cmd} />}
        </div>
      </header>
      <section className="card" aria-labelledby="destroy-heading">
        <h2 id="destroy-heading">terraform destroy</h2>
        <RunProgress live={live} label="Destroy" />
        {cmd && <RunOutcome cmd={cmd} />}
        {cmd?.status === 'succeeded' && (
          <div className="success-box" role="status" data-testid="destroy-succeeded">
            <strong>Destroyed.</strong> Every resource in the workspace's state was destroyed and removed from it.
          </div>
        )}
        {cmd && cmd.type !== 'terraform_destroy' && <Notice tone="warn">This command is a {cmd.type}, not a destroy.</Notice>}
      </section>
      <RunLog live={live} title="Destroy log" />
    </div>
  );
}
