// The review of a Terraform plan: Terraform's "Plan: …" line and the resource changes grouped
// by action, with Terraform's symbols; a destroy plan says first that applying it destroys what
// it lists. Addresses and actions only: the plan result carries no attribute or variable value
// (protocol/README.md, `terraform_plan`).
import { groupByAction, hasChanges, planLine, type PlanSummary } from '../lib/terraform';

export function PlanReview({ summary }: { summary: PlanSummary }) {
  const groups = groupByAction(summary.resources);
  const changes = hasChanges(summary);
  return (
    <div className="plan-review" data-testid="plan-review" data-changes={changes ? 'yes' : 'no'} data-mode={summary.mode}>
      {summary.mode === 'destroy' && (
        <p className="plan-mode-destroy" data-testid="plan-mode">
          <strong>Destroy plan.</strong> {changes ? 'Approving it destroys every resource listed below and removes it from the workspace’s state.' : 'The workspace’s state has no resources to destroy.'}
        </p>
      )}
      <p className={changes ? 'plan-line' : 'plan-line plan-line-none'} data-testid="plan-line">
        <strong>{planLine(summary)}</strong>
      </p>
      {groups.map((g) => {
        const headingId = `plan-group-${g.action}`;
        return (
          <section key={g.action} className={`plan-group plan-${g.action}`} aria-labelledby={headingId} data-testid={`plan-group-${g.action}`}>
            <h3 id={headingId}>
              {g.title} <span className="muted">({g.resources.length})</span>
            </h3>
            <ul>
              {g.resources.map((r) => (
                <li key={r.address} data-testid="plan-resource" data-action={r.action} data-address={r.address}>
                  <span className="plan-symbol mono" aria-hidden="true">
                    {g.symbol}
                  </span>{' '}
                  <span className="mono">{r.address}</span>
                </li>
              ))}
            </ul>
          </section>
        );
      })}
      {(summary.resolvedCommit || summary.planSha256) && (
        <p className="muted small">
          {summary.resolvedCommit && (
            <>
              Commit <span className="mono">{summary.resolvedCommit.slice(0, 12)}</span>
            </>
          )}
          {summary.resolvedCommit && summary.planSha256 && ' · '}
          {summary.planSha256 && (
            <>
              plan file SHA-256 <span className="mono" title={summary.planSha256}>{summary.planSha256.slice(0, 16)}…</span>
            </>
          )}
        </p>
      )}
    </div>
  );
}
