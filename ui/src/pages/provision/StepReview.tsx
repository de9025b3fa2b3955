import { Fragment } from 'react';
import type { Agent, Template } from '../../lib/types';
import { formatMemory } from '../../lib/time';
import { ErrorBox, Notice, StatusPill } from '../../components/ui';
import type { Config } from './provisionReducer';
import { cloneSummary, type CloneConfig } from './cloneOptions';

/** Step 4: everything the provision command will use, before it is sent. */
export function StepReview({
  agent,
  template,
  targetNode,
  config,
  clone,
  keepOnFailure,
  isNew,
  submitError,
}: {
  agent: Agent;
  template: Template;
  targetNode: string;
  config: Config;
  /** The Proxmox clone options of the Configure step. */
  clone: CloneConfig;
  keepOnFailure: boolean;
  isNew: boolean;
  submitError: string | null;
}) {
  const options = cloneSummary(clone);
  return (
    <div data-testid="review-step">
      <dl className="review">
        <dt>Hypervisor</dt>
        <dd>
          {agent.name} <StatusPill status={agent.status} />
        </dd>
        <dt>Proxmox node</dt>
        <dd>{targetNode || template.proxmoxNode || 'template’s node'}</dd>
        <dt>Template</dt>
        <dd>
          {template.name} <span className="muted">(Proxmox VMID {template.proxmoxTemplateId})</span>
        </dd>
        <dt>VM name</dt>
        <dd data-testid="review-name">{config.name}</dd>
        {isNew && config.application.trim() && (
          <>
            <dt>Application</dt>
            <dd>{config.application}</dd>
          </>
        )}
        <dt>Memory</dt>
        <dd>
          {config.memory} MiB <span className="muted">({formatMemory(Number(config.memory))})</span>
        </dd>
        <dt>Cores</dt>
        <dd>{config.cores}</dd>
        {template.networkBridge && (
          <>
            <dt>Network bridge</dt>
            <dd>{template.networkBridge}</dd>
          </>
        )}
        {template.postProvisionCommands.length > 0 && (
          <>
            <dt>Post-provision</dt>
            <dd>
              <pre className="mini-pre">{template.postProvisionCommands.join('\n')}</pre>
            </dd>
          </>
        )}
        <dt>Proxmox options</dt>
        <dd data-testid="review-clone-options">
          {options.length === 0 ? (
            <span className="muted">Proxmox defaults (linked clone on the template’s storage, next free VMID)</span>
          ) : (
            <dl className="review compact">
              {options.map((o) => (
                <Fragment key={o.field}>
                  <dt>{o.label}</dt>
                  <dd data-testid={`review-clone-${o.field}`}>{o.value}</dd>
                </Fragment>
              ))}
            </dl>
          )}
        </dd>
        <dt>If it fails</dt>
        <dd data-testid="review-keep-on-failure">{keepOnFailure ? 'Keep the VM for inspection' : 'Delete the half-made VM'}</dd>
      </dl>
      {agent.status !== 'online' && <Notice tone="warn">{agent.name} is offline right now.</Notice>}
      {submitError && <ErrorBox title="Could not start provisioning">{submitError}</ErrorBox>}
    </div>
  );
}
