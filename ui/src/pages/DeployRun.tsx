// The Deploy page after the form: a plan followed live, its review, then Apply (exactly that
// saved plan) or Discard; the apply followed live below it. A destroy plan (a workspace's
// Destroy) is the same page: its review lists what would be destroyed, and "Approve destroy"
// — enabled only once the workspace name is typed — applies exactly that plan. Each run reuses
// the command page's parts: the live stream (useLiveCommand), the stage list, the progress bar
// and the log viewer.
import { useState, type ReactNode } from 'react';
import { errorMessage } from '../lib/api';
import { useLiveCommand, type LiveCommand } from '../lib/hooks';
import { useAgent, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { commandPercent, failedStage, stageLabel } from '../lib/stages';
import { UI_META, applyGate, destroyGate, isDestroyPlan, planAgain, planErrorHint, planSummary, workspaceConfirmed } from '../lib/terraform';
import { commandError, isTerminal, type Command } from '../lib/types';
import { cancelledSentence } from '../lib/commandText';
import { ErrorBox, Field, JsonView, Notice, ProgressBar, Spinner, StatusPill, shortId } from '../components/ui';
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

/** Plan → review → Apply or Discard (a destroy plan: Approve destroy, with the typed name), and the apply once started. */
export function PlanRun({ planId, applyId }: { planId: string; applyId: string | null }) {
  const plan = useLiveCommand(planId);
  const apply = useLiveCommand(applyId);
  const m = useMutations();
  const [busy, setBusy] = useState<'apply' | 'discard' | 'replan' | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [confirmCancel, setConfirmCancel] = useState(false);
  const [cancelErr, setCancelErr] = useState<string | null>(null);
  const [typed, setTyped] = useState('');
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
  const destroying = isDestroyPlan(cmd);
  const workspace = cmd.target?.workspace ?? null;
  // Apply is gated by the plan; Approve destroy also by the typed workspace name.
  const planGate = applyGate(cmd, !!applyId);
  const gate = destroying ? destroyGate(cmd, typed, !!applyId) : planGate;
  const applyCmd = apply.command;
  const planEnded = isTerminal(cmd.status);
  const applyLabel = destroying ? 'Destroy' : 'Apply';

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
  // Once a destroy is done, planning again shows what the configuration would create; until
  // then (a failed, stale or unapplied destroy plan) it makes a fresh destroy plan.
  const replanDestroy = destroying && applyCmd?.status !== 'succeeded';
  const doReplan = act('replan', async () => {
    const id = await planAgain(m, cmd, undefined, replanDestroy);
    navigate(`/deploy?plan=${encodeURIComponent(id)}`);
  });
  const replanButton = (
    <button type="button" className="btn" onClick={doReplan} disabled={busy !== null} data-testid="plan-again">
      {busy === 'replan' ? 'Planning…' : replanDestroy ? 'Plan the destroy again' : 'Plan again'}
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
            {applyId ? applyLabel : destroying ? 'Review destroy' : 'Review plan'} <StatusPill status={cmd.status} />
          </h1>
          <RunMeta cmd={cmd} />
        </div>
      </header>
      {error && <ErrorBox>{error}</ErrorBox>}

      <section className="card" aria-labelledby="plan-heading" data-testid="plan-card" data-mode={destroying ? 'destroy' : 'normal'}>
        <h2 id="plan-heading">{destroying ? 'Destroy plan' : 'Plan'}</h2>
        {destroying && !summary && !isTerminal(cmd.status) && (
          <p className="muted small">Terraform is planning the destruction of every resource in the workspace’s state. Nothing is destroyed until you approve the plan.</p>
        )}
        {summary ? <PlanReview summary={summary} /> : <RunProgress live={plan} label="Plan" />}
        <RunOutcome cmd={cmd} action={replanButton} />
        {!applyId && destroying && summary && planGate.ok && workspace && (
          <div className="destroy-approve">
            <Field label="Type the workspace name to approve the destroy" hint={workspace} error={typed.trim() && !workspaceConfirmed(typed, workspace) ? 'The name does not match.' : null}>
              {(p) => <input {...p} value={typed} onChange={(e) => setTyped(e.target.value)} autoComplete="off" spellCheck={false} className="mono" data-testid="destroy-confirm" />}
            </Field>
          </div>
        )}
        {!applyId && (
          <div className="btn-row plan-actions">
            <button
              type="button"
              className={destroying ? 'btn btn-danger' : 'btn btn-primary'}
              onClick={doApply}
              disabled={!gate.ok || busy !== null}
              aria-describedby={gate.ok ? undefined : 'apply-why'}
              data-testid="plan-apply"
            >
              {busy === 'apply' ? 'Starting…' : destroying ? 'Approve destroy' : 'Apply this plan'}
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
        {!applyId && summary && planGate.ok && (
          <p className="muted small">
            {destroying
              ? "Approve destroy applies exactly this destroy plan on the agent that made it: the resources listed are destroyed and removed from the workspace's state. It is refused if the state changed since; Discard destroys nothing (the agent deletes the plan after 24 hours)."
              : "Apply runs exactly this saved plan on the agent that made it. It is refused if the workspace's state changed since; Discard leaves it unapplied (the agent deletes it after 24 hours)."}
          </p>
        )}
      </section>

      {applyId && (
        <section className="card" aria-labelledby="apply-heading" data-testid="apply-card" data-status={applyCmd?.status ?? 'loading'}>
          <h2 id="apply-heading">
            {applyLabel} {applyCmd && <StatusPill status={applyCmd.status} />}
          </h2>
          <RunProgress live={apply} label={applyLabel} />
          {applyCmd && !isTerminal(applyCmd.status) && (
            <div className="btn-row">
              <button type="button" className="btn btn-danger-ghost" onClick={() => setConfirmCancel(true)} disabled={applyCmd.cancelRequested} data-testid="apply-cancel">
                {applyCmd.cancelRequested ? 'Cancelling…' : `Cancel ${applyLabel.toLowerCase()}`}
              </button>
            </div>
          )}
          {applyCmd && <RunOutcome cmd={applyCmd} action={replanButton} />}
          {applyCmd?.status === 'succeeded' && (
            <div className="success-box" role="status" data-testid="apply-succeeded">
              {destroying ? (
                <>
                  <strong>Destroyed.</strong> The resources the plan listed are destroyed and removed from the workspace's state, stored by Trellis.
                </>
              ) : (
                <>
                  <strong>Applied.</strong> The plan's changes are made and the workspace's new state is stored by Trellis.
                </>
              )}
              <div className="btn-row">
                {replanButton}
                <a className="btn" href="#/deploy">
                  New deploy
                </a>
              </div>
            </div>
          )}
          {applyCmd?.status === 'succeeded' && applyCmd.result != null && !destroying && (
            <details>
              <summary>Outputs</summary>
              <JsonView value={(applyCmd.result as { outputs?: unknown }).outputs ?? applyCmd.result} />
            </details>
          )}
        </section>
      )}
      {applyId && <RunLog live={apply} title={`${applyLabel} log`} />}
      <RunLog live={plan} title="Plan log" />
      {confirmCancel && applyCmd && (
        <ConfirmDialog
          title={`Cancel this ${applyLabel.toLowerCase()}?`}
          confirmLabel={`Cancel ${applyLabel.toLowerCase()}`}
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
