// The Deploy page: Plan → review → Apply or Discard. The form submits a `terraform_plan`; the
// page then follows the plan live and shows its changes by action (DeployRun.tsx), and Apply
// applies exactly that saved plan. Below the form, the workspaces whose state Trellis keeps,
// with their versions, last apply and a Destroy, which makes a destroy plan reviewed and
// approved on the same page (TerraformWorkspaces.tsx). The one-step `terraform_apply` (plan
// and apply at once) and `terraform_destroy` stay in the API for automation.
import { useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useAgents, useMutations } from '../lib/queries';
import { navigate } from '../lib/router';
import { parseNameList, parseTerraformVars, validateGitRef, validateRepoPath, validateRequired } from '../lib/validation';
import { ErrorBox, Field, Notice, Spinner, shortId } from '../components/ui';
import { stripUrlCredentials } from '../lib/redact';
import { PlanRun } from './DeployRun';
import { TerraformWorkspaces } from './TerraformWorkspaces';

const LAST_KEY = 'trellis.deploy.last';

interface DeployForm {
  agentId: string;
  repo: string;
  version: string;
  path: string;
  workspace: string;
  vars: string;
  sensitive: string;
  reason: string;
  timeout: string;
}

/** Builds the config snapshot (`terraform_plan` params) from the form (vars must already be valid). */
export function buildSnapshot(f: Omit<DeployForm, 'workspace'> & { workspace?: string }, vars: Record<string, unknown>) {
  return {
    template_source: {
      repo: f.repo.trim(),
      version: f.version.trim(),
      ...(f.path.trim() ? { path: f.path.trim().replace(/^\.\//, '') } : {}),
    },
    terraform_vars: vars,
    sensitive_vars: parseNameList(f.sensitive),
    ...(f.workspace?.trim() ? { workspace_key: f.workspace.trim() } : {}),
    meta: { triggered_by: 'trellis-ui', reason: f.reason.trim() || null },
  };
}

export function validateDeploy(f: DeployForm): Partial<Record<keyof DeployForm, string | null>> {
  const vars = parseTerraformVars(f.vars);
  const timeout = f.timeout.trim();
  return {
    agentId: f.agentId ? null : 'Choose an agent.',
    repo: validateRequired(f.repo, 'Repository'),
    version: validateGitRef(f.version),
    path: validateRepoPath(f.path),
    vars: vars.ok ? null : vars.error,
    timeout: timeout === '' || (/^\d+$/.test(timeout) && Number(timeout) >= 10 && Number(timeout) <= 86400) ? null : 'Timeout is 10 – 86400 seconds.',
  };
}

type LastDeploy = Partial<Pick<DeployForm, 'agentId' | 'repo' | 'version' | 'path' | 'workspace'>>;

/** The last deploy's choices, for the next form; a repository URL's credentials are never kept. */
export function loadLastDeploy(storage: Pick<Storage, 'getItem' | 'setItem'> | undefined = globalThis.localStorage): LastDeploy {
  try {
    const v = JSON.parse(storage?.getItem(LAST_KEY) ?? '{}') as LastDeploy;
    // Older versions stored the URL as typed: rewrite it without its credentials.
    if (typeof v.repo === 'string' && stripUrlCredentials(v.repo) !== v.repo) {
      saveLastDeploy(v, storage);
      return { ...v, repo: stripUrlCredentials(v.repo) };
    }
    return v;
  } catch {
    return {};
  }
}

export function saveLastDeploy(v: LastDeploy, storage: Pick<Storage, 'setItem'> | undefined = globalThis.localStorage): void {
  try {
    storage?.setItem(LAST_KEY, JSON.stringify({ ...v, repo: stripUrlCredentials(v.repo ?? '') }));
  } catch {
    /* storage full or disabled */
  }
}

function newKey(): string {
  return typeof crypto !== 'undefined' && 'randomUUID' in crypto ? crypto.randomUUID() : `ui-${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/** The page: the form, or the run the URL names (`?plan=ID[&apply=ID]`, a destroy plan too). */
export function Deploy({ query }: { query?: URLSearchParams }) {
  const plan = query?.get('plan') ?? null;
  const destroy = query?.get('destroy') ?? null;
  // The form stays mounted-in-state while a run is shown, so Discard comes back to what was typed.
  const [form, setForm] = useState<DeployForm>(initialForm);
  if (destroy) return <OneStepDestroy id={destroy} />;
  if (plan) return <PlanRun key={plan} planId={plan} applyId={query?.get('apply') ?? null} />;
  return <PlanForm f={form} setF={setForm} />;
}

/** A link of the earlier one-step destroy (`?destroy=ID`): such commands are shown on their command page. */
function OneStepDestroy({ id }: { id: string }) {
  return (
    <div className="page">
      <a href="#/deploy" className="back">
        ← Deploy
      </a>
      <Notice>
        Destroys are now a destroy plan you review and approve on this page. Command{' '}
        <a href={`#/commands/${encodeURIComponent(id)}`} className="mono">
          {shortId(id)}
        </a>{' '}
        is shown on its command page.
      </Notice>
    </div>
  );
}

function initialForm(): DeployForm {
  const last = loadLastDeploy();
  return {
    agentId: last.agentId ?? '',
    repo: last.repo ?? '',
    version: last.version ?? 'main',
    path: last.path ?? '',
    workspace: last.workspace ?? '',
    vars: '{\n  \n}',
    sensitive: '',
    reason: '',
    timeout: '',
  };
}

function PlanForm({ f, setF }: { f: DeployForm; setF: (f: DeployForm) => void }) {
  const agents = useAgents();
  const m = useMutations();
  const [touched, setTouched] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  // One idempotency key per form submission attempt sequence, so a double click does not run twice.
  const [idemKey, setIdemKey] = useState(newKey);

  const capable = (agents.data ?? []).filter((a) => a.capabilities.includes('terraform_plan'));
  const selected = capable.find((a) => a.id === f.agentId);
  const agentId = f.agentId || (capable.length === 1 ? capable[0].id : '');
  const form = { ...f, agentId };
  const errs = validateDeploy(form);
  const varsErr = f.vars.trim() ? errs.vars : null; // shown live, the rest after submit
  const show = (k: keyof DeployForm) => (k === 'vars' ? varsErr : touched ? errs[k] : null);
  const set = (k: keyof DeployForm) => (e: { target: { value: string } }) => {
    setF({ ...f, [k]: e.target.value });
    setIdemKey(newKey());
  };

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched(true);
    if (Object.values(errs).some(Boolean)) return;
    const vars = parseTerraformVars(form.vars);
    if (!vars.ok) return;
    setBusy(true);
    setError(null);
    try {
      const r = await m.createCommand({
        agentId,
        type: 'terraform_plan',
        params: buildSnapshot(form, vars.value),
        idempotencyKey: idemKey,
        ...(form.timeout.trim() ? { timeoutSecs: Number(form.timeout) } : {}),
      });
      saveLastDeploy({ agentId, repo: form.repo, version: form.version, path: form.path, workspace: form.workspace });
      setIdemKey(newKey());
      navigate(`/deploy?plan=${encodeURIComponent(r.commandId)}`);
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="page page-narrow">
      <header className="page-head">
        <div>
          <h1>Deploy</h1>
          <p className="muted">Plan a Terraform configuration on an agent, review the changes, then apply exactly that plan or discard it.</p>
        </div>
      </header>
      {agents.error && <ErrorBox>{errorMessage(agents.error)}</ErrorBox>}
      {agents.isPending ? (
        <Spinner />
      ) : (
        <form className="card form" onSubmit={submit} noValidate data-testid="deploy-form">
          {capable.length === 0 && <Notice tone="warn">No agent has the terraform_plan capability.</Notice>}
          <Field label="Agent" error={show('agentId')}>
            {(p) => (
              <select {...p} value={agentId} onChange={set('agentId')} data-testid="deploy-agent">
                <option value="">Choose…</option>
                {capable.map((a) => (
                  <option key={a.id} value={a.id}>
                    {a.name} — {a.status}
                  </option>
                ))}
              </select>
            )}
          </Field>
          {(selected ?? capable.find((a) => a.id === agentId))?.status === 'offline' && (
            <Notice tone="warn">This agent is offline: the command will wait in the queue until it connects.</Notice>
          )}
          <fieldset className="fieldset">
            <legend>Template source</legend>
            <Field label="Repository" error={show('repo')} hint="Git URL, file:// URL or a path on the agent">
              {(p) => <input {...p} value={f.repo} onChange={set('repo')} placeholder="https://git.example.com/infra/app.git" className="mono" data-testid="deploy-repo" />}
            </Field>
            <div className="grid2">
              <Field label="Version" error={show('version')} hint="Tag, branch or commit">
                {(p) => <input {...p} value={f.version} onChange={set('version')} className="mono" data-testid="deploy-version" />}
              </Field>
              <Field label="Path (optional)" error={show('path')} hint="Sub-directory inside the repository">
                {(p) => <input {...p} value={f.path} onChange={set('path')} className="mono" data-testid="deploy-path" />}
              </Field>
            </div>
          </fieldset>
          <Field label="Workspace (optional)" hint="Name of the Terraform state workspace; default: the repository and path">
            {(p) => <input {...p} value={f.workspace} onChange={set('workspace')} className="mono" placeholder="e.g. web-prod" data-testid="deploy-workspace" />}
          </Field>
          <Field label="Variables (JSON object)" error={show('vars')} hint="Written to terraform.tfvars.json">
            {(p) => <textarea {...p} rows={8} value={f.vars} onChange={set('vars')} className="mono" spellCheck={false} data-testid="deploy-vars" />}
          </Field>
          <Field label="Sensitive variable names" hint="Comma-separated; their values are redacted from logs and results (names containing password, secret, token are always redacted)">
            {(p) => <input {...p} value={f.sensitive} onChange={set('sensitive')} className="mono" placeholder="db_password, api_key" data-testid="deploy-sensitive" />}
          </Field>
          <div className="grid2">
            <Field label="Reason" hint="Stored in the snapshot's meta">
              {(p) => <input {...p} value={f.reason} onChange={set('reason')} placeholder="e.g. release 1.4.2" data-testid="deploy-reason" />}
            </Field>
            <Field label="Timeout (seconds, optional)" error={show('timeout')}>
              {(p) => <input {...p} inputMode="numeric" value={f.timeout} onChange={set('timeout')} placeholder="server default" />}
            </Field>
          </div>
          {error && <ErrorBox title="The server refused the plan">{error}</ErrorBox>}
          <div className="btn-row">
            <button type="submit" className="btn btn-primary" disabled={busy} data-testid="deploy-submit">
              {busy ? 'Submitting…' : 'Plan'}
            </button>
            <span className="muted small">Nothing changes until you review the plan and apply it.</span>
          </div>
        </form>
      )}
      <TerraformWorkspaces />
    </div>
  );
}
