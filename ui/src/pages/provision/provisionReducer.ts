// State of the Provision Node wizard as a pure reducer: hypervisor → template → configure →
// review → provisioning. The lists it validates against (agents, templates) come from the
// query cache and are passed in with the actions that need them (`Catalog`).
import type { Agent, ProvisionRequest, Template, VmNode } from '../../lib/types';
import { validateCores, validateMemory, validateVmName } from '../../lib/validation';
import { countOf, expandNames, validateCount } from '../../lib/bulk';
import { cloneConfigFromParams, cloneErrors, cloneOptionsOf, EMPTY_CLONE, fieldOfError, withTemplateDefaults, type CloneConfig } from './cloneOptions';

export const STEPS = ['hypervisor', 'template', 'configure', 'review', 'provisioning'] as const;
export type Step = (typeof STEPS)[number];
export const STEP_LABEL: Record<Step, string> = {
  hypervisor: 'Hypervisor',
  template: 'Template',
  configure: 'Configure',
  review: 'Review',
  provisioning: 'Provisioning',
};

export interface Config {
  name: string;
  memory: string;
  cores: string;
  application: string;
}

export type ConfigErrors = Partial<Record<keyof Config | keyof CloneConfig, string | null>>;

/** The server lists the wizard validates against. */
export interface Catalog {
  agents: Agent[];
  templates: Template[];
  /** Names of the existing nodes (for the duplicate-name warning); absent = not known. */
  nodeNames?: string[];
}

export interface ProvisionState {
  step: Step;
  /** The provision command the last step follows. */
  commandId: string | null;
  /** The node being provisioned; null until the wizard creates one (new-node mode). */
  node: VmNode | null;
  agentId: string;
  /** Proxmox node for the VM; '' = the template's node. */
  targetNode: string;
  templateId: string;
  config: Config;
  /** Keep a VM whose provision failed half-way, for inspection (`ProvisionRequest.keepOnFailure`). */
  keepOnFailure: boolean;
  /** Show every configure error (after a Next on that step), not only the edited fields'. */
  showAllErrors: boolean;
  stepError: string | null;
  /** The only usable hypervisor was selected once; not again after the user cleared it. */
  autoPicked: boolean;
  submitting: boolean;
  submitError: string | null;
  retrying: boolean;
  retryError: string | null;
  /** New nodes only: how many to create (1–50); above 1 the name is a pattern (`web-{n}`). */
  count: string;
  /** The bulk provision the last step follows (instead of `commandId`). */
  batchId: string | null;
  /** Proxmox clone options (Configure step). */
  clone: CloneConfig;
  /** The admin chose to use a name another node has (`force` on create). */
  forceName: boolean;
  /** A field a failed command named: focused and marked with the server's message until edited. */
  serverError: { field: keyof Config | keyof CloneConfig; message: string } | null;
}

export type ProvisionAction =
  | { type: 'selectAgent'; agentId: string }
  /** The agent list arrived: select the only usable hypervisor if none is selected. */
  | { type: 'agentsLoaded'; agents: Agent[] }
  | { type: 'setTargetNode'; targetNode: string }
  | { type: 'selectTemplate'; templateId: string }
  /** The selected template is known: fill memory/cores the user has not set. */
  | { type: 'templateDefaults'; template: Template }
  | { type: 'setConfig'; config: Config }
  | { type: 'setKeepOnFailure'; keep: boolean }
  | { type: 'next'; catalog: Catalog }
  | { type: 'back' }
  | { type: 'goTo'; step: Step; catalog: Catalog }
  | { type: 'submitStart' }
  | { type: 'submitFailed'; error: string }
  | { type: 'nodeSaved'; node: VmNode }
  | { type: 'provisionStarted'; commandId: string }
  | { type: 'retryStart' }
  | { type: 'retryFailed'; error: string }
  | { type: 'retryStarted'; commandId: string }
  /** From a failed provisioning: back to the first step with the same settings. */
  | { type: 'changeSettings'; error?: { code: string; message: string; details?: unknown } | null; params?: unknown }
  | { type: 'setClone'; clone: CloneConfig }
  | { type: 'setForceName'; force: boolean }
  | { type: 'setCount'; count: string }
  | { type: 'batchStarted'; batchId: string };

/** Why a hypervisor cannot take a provision command, or null when it can. */
export function hypervisorUnavailable(a: Agent): string | null {
  if (a.status !== 'online') return 'Offline — start its tendril agent to use it';
  if (!a.capabilities.includes('provision')) return 'Its agent cannot provision VMs (no provision capability)';
  return null;
}

/** The step the wizard opens on for a node. */
export function initialStep(node: VmNode | null): { step: Step; commandId: string | null } {
  // A provisioning node follows its live command; a failed one shows the error with Retry;
  // an already provisioned one shows how it went (e.g. after a reload on the success screen).
  if (node?.lastCommandId && (node.status === 'provisioning' || node.status === 'failed' || node.vmId != null)) {
    return { step: 'provisioning', commandId: node.lastCommandId };
  }
  return { step: 'hypervisor', commandId: null };
}

/** The provision request the wizard sends for its current settings. */
export function provisionRequest(s: Pick<ProvisionState, 'targetNode' | 'keepOnFailure'> & { clone?: CloneConfig }, agentId: string): ProvisionRequest {
  const cloneOptions = s.clone ? cloneOptionsOf(s.clone) : undefined;
  return { agentId, keepOnFailure: s.keepOnFailure, ...(s.targetNode ? { targetNode: s.targetNode } : {}), ...(cloneOptions ? { cloneOptions } : {}) };
}

export function configErrors(c: Config, needName: boolean): ConfigErrors {
  return {
    name: needName ? validateVmName(c.name) : null,
    memory: validateMemory(c.memory),
    cores: validateCores(c.cores),
  };
}

export function initProvisionState(node: VmNode | null): ProvisionState {
  const init = initialStep(node);
  return {
    step: init.step,
    commandId: init.commandId,
    node,
    agentId: node?.hypervisorId ?? '',
    targetNode: '',
    templateId: node?.templateId ?? '',
    config: {
      name: node?.name ?? '',
      memory: node ? String(node.memory) : '',
      cores: node ? String(node.cores) : '',
      application: node?.application ?? '',
    },
    keepOnFailure: false,
    showAllErrors: false,
    stepError: null,
    autoPicked: false,
    submitting: false,
    submitError: null,
    retrying: false,
    retryError: null,
    count: '1',
    batchId: null,
    clone: EMPTY_CLONE,
    forceName: false,
    serverError: null,
  };
}

/** What the state means against the current lists. */
export interface Derived {
  agent: Agent | undefined;
  template: Template | undefined;
  /** The wizard creates the node (no record yet). */
  isNew: boolean;
  /** A provisioned VM keeps its name. */
  nameEditable: boolean;
  configErrors: ConfigErrors;
  configValid: boolean;
  /** The count field's error (new nodes only). */
  countError: string | null;
  /** More than one node: the name is a pattern. */
  bulk: boolean;
  agentOk: boolean;
  templateOk: boolean;
  /** Another node already has the (single) name. */
  nameTaken: boolean;
}

export function derive(s: ProvisionState, c: Catalog): Derived {
  const agent = c.agents.find((a) => a.id === s.agentId);
  const template = c.templates.find((t) => t.id === s.templateId);
  const nameEditable = !s.node || s.node.vmId === null;
  const errs = configErrors(s.config, nameEditable);
  // Many new nodes at once: the name is a pattern such as web-{n}.
  const countError = s.node === null ? validateCount(s.count ?? '1') : null;
  const bulk = s.node === null && !countError && countOf(s.count) > 1;
  if (bulk) errs.name = expandNames(s.config.name, countOf(s.count)).error;
  const clone = s.clone ?? EMPTY_CLONE;
  Object.assign(errs, cloneErrors(clone));
  if (s.serverError && !errs[s.serverError.field]) errs[s.serverError.field] = s.serverError.message;
  const wanted = s.config.name.trim().toLowerCase();
  const renamed = !s.node || s.node.name.toLowerCase() !== wanted;
  const nameTaken = !bulk && renamed && !!wanted && (c.nodeNames ?? []).some((n) => n.toLowerCase() === wanted);
  if (nameTaken && !s.forceName && nameEditable && !errs.name) errs.name = 'Another node already has this name.';
  return {
    agent,
    template,
    isNew: s.node === null,
    nameEditable,
    configErrors: errs,
    configValid: !Object.values(errs).some(Boolean) && !countError,
    countError,
    bulk,
    agentOk: !!agent && !hypervisorUnavailable(agent),
    templateOk: !!template && template.proxmoxTemplateId != null,
    nameTaken,
  };
}

/** Whether the stepper may jump to `target` now. Nothing is reachable while provisioning. */
export function reachable(s: ProvisionState, c: Catalog, target: Step): boolean {
  if (s.step === 'provisioning') return false;
  const d = derive(s, c);
  switch (target) {
    case 'hypervisor':
      return true;
    case 'template':
      return d.agentOk;
    case 'configure':
      return d.agentOk && d.templateOk;
    case 'review':
      return d.agentOk && d.templateOk && d.configValid;
    default:
      return false;
  }
}

/** Why Next cannot leave the current step, or null when it can. */
export function nextBlocker(s: ProvisionState, c: Catalog): string | null {
  const d = derive(s, c);
  switch (s.step) {
    case 'hypervisor': {
      if (!d.agent) return 'Choose a hypervisor.';
      const why = hypervisorUnavailable(d.agent);
      return why ? `${d.agent.name}: ${why}.` : null;
    }
    case 'template':
      if (!d.template) return 'Choose a template.';
      return d.template.proxmoxTemplateId == null ? `${d.template.name} is not mapped to a Proxmox template.` : null;
    case 'configure':
      return d.configValid ? null : 'Fix the highlighted fields.';
    default:
      return null;
  }
}

const NEXT: Partial<Record<Step, Step>> = { hypervisor: 'template', template: 'configure', configure: 'review' };

export function provisionReducer(s: ProvisionState, a: ProvisionAction): ProvisionState {
  switch (a.type) {
    case 'selectAgent':
      return { ...s, agentId: a.agentId };
    case 'agentsLoaded': {
      if (s.step !== 'hypervisor' || s.agentId || s.autoPicked) return s;
      const usable = a.agents.filter((ag) => !hypervisorUnavailable(ag));
      if (usable.length !== 1) return s;
      return { ...s, agentId: usable[0].id, autoPicked: true };
    }
    case 'setTargetNode':
      return { ...s, targetNode: a.targetNode };
    case 'selectTemplate':
      return { ...s, templateId: a.templateId };
    case 'templateDefaults': {
      if (a.template.id !== s.templateId) return s;
      const memory = s.config.memory || String(a.template.memory);
      const cores = s.config.cores || String(a.template.cores);
      const clone = withTemplateDefaults(s.clone ?? EMPTY_CLONE, a.template);
      if (memory === s.config.memory && cores === s.config.cores && clone === s.clone) return s;
      return { ...s, config: { ...s.config, memory, cores }, clone };
    }
    case 'setConfig': {
      const edited = s.serverError && s.serverError.field in a.config && a.config[s.serverError.field as keyof Config] !== s.config[s.serverError.field as keyof Config];
      const renamed = a.config.name !== s.config.name;
      return { ...s, config: a.config, serverError: edited ? null : s.serverError, forceName: renamed ? false : s.forceName };
    }
    case 'setClone': {
      const f = s.serverError?.field as keyof CloneConfig | undefined;
      const edited = !!f && f in a.clone && a.clone[f] !== (s.clone ?? EMPTY_CLONE)[f];
      return { ...s, clone: a.clone, serverError: edited ? null : s.serverError };
    }
    case 'setForceName':
      return { ...s, forceName: a.force };
    case 'setKeepOnFailure':
      return { ...s, keepOnFailure: a.keep };
    case 'next': {
      const to = NEXT[s.step];
      if (!to) return s;
      const base = s.step === 'configure' ? { ...s, showAllErrors: true } : s;
      const blocker = nextBlocker(s, a.catalog);
      if (blocker) return { ...base, stepError: blocker };
      return { ...base, step: to, stepError: null };
    }
    case 'back': {
      const i = STEPS.indexOf(s.step);
      if (i <= 0 || s.step === 'provisioning') return s.stepError ? { ...s, stepError: null } : s;
      return { ...s, step: STEPS[i - 1], stepError: null };
    }
    case 'goTo':
      if (a.step === s.step || !reachable(s, a.catalog, a.step)) return s;
      return { ...s, step: a.step, stepError: null };
    case 'submitStart':
      return { ...s, submitting: true, submitError: null };
    case 'submitFailed':
      return { ...s, submitting: false, submitError: a.error };
    case 'nodeSaved':
      return { ...s, node: a.node };
    case 'provisionStarted':
      return { ...s, submitting: false, commandId: a.commandId, step: 'provisioning' };
    case 'retryStart':
      return { ...s, retrying: true, retryError: null };
    case 'retryFailed':
      return { ...s, retrying: false, retryError: a.error };
    case 'retryStarted':
      return { ...s, retrying: false, commandId: a.commandId };
    case 'setCount':
      return { ...s, count: a.count };
    case 'batchStarted':
      return { ...s, submitting: false, batchId: a.batchId, step: 'provisioning' };
    case 'changeSettings': {
      if (s.step !== 'provisioning') return s;
      const field = fieldOfError(a.error?.details);
      const clone = cloneConfigFromParams(a.params) ?? s.clone ?? EMPTY_CLONE;
      const base = { ...s, commandId: null, retryError: null, clone };
      // A failure that names a setting opens Configure with that field marked; else the first step.
      if (field && s.agentId && s.templateId) {
        return { ...base, step: 'configure', serverError: { field, message: a.error?.message ?? 'Proxmox refused this setting.' }, showAllErrors: true };
      }
      return { ...base, step: 'hypervisor', serverError: null };
    }
  }
}
