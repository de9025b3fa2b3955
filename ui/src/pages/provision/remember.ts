// The provision modal remembers the last hypervisor and template an admin chose (ids only,
// nothing secret) in localStorage, so the next new node starts from them.
import type { ProvisionState } from './provisionReducer';

const KEY = 'trellis.provision.last';

export interface LastChoice {
  agentId?: string;
  templateId?: string;
}

export function loadLastChoice(storage: Pick<Storage, 'getItem'> | undefined = globalThis.localStorage): LastChoice {
  try {
    const v = JSON.parse(storage?.getItem(KEY) ?? '{}') as unknown;
    if (!v || typeof v !== 'object') return {};
    const o = v as Record<string, unknown>;
    return {
      ...(typeof o.agentId === 'string' ? { agentId: o.agentId } : {}),
      ...(typeof o.templateId === 'string' ? { templateId: o.templateId } : {}),
    };
  } catch {
    return {};
  }
}

export function saveLastChoice(c: LastChoice, storage: Pick<Storage, 'setItem'> | undefined = globalThis.localStorage): void {
  try {
    storage?.setItem(KEY, JSON.stringify({ agentId: c.agentId, templateId: c.templateId }));
  } catch {
    // Storage full or disabled: nothing to remember then.
  }
}

/** A new node's wizard preselects the last choice (an existing node keeps its own). */
export function withLastChoice(s: ProvisionState, last: LastChoice): ProvisionState {
  if (s.node) return s;
  return { ...s, agentId: s.agentId || last.agentId || '', templateId: s.templateId || last.templateId || '' };
}
