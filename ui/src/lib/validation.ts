// Form validation shared by the provision modal, node and template forms and the deploy page.
// The limits mirror the control plane's (protocol crate): memory 16…4194304 MiB, cores 1…512,
// names valid DNS names of at most 63 characters.

export const MIN_MEMORY = 16;
export const MAX_MEMORY = 4 * 1024 * 1024;
export const MIN_CORES = 1;
export const MAX_CORES = 512;

/** null when valid, else a message for the user. */
export type Check = string | null;

function parseInteger(raw: string | number): number | null {
  if (typeof raw === 'number') return Number.isInteger(raw) ? raw : null;
  const s = raw.trim();
  if (!/^\d+$/.test(s)) return null;
  return Number(s);
}

export function validateMemory(raw: string | number): Check {
  if (typeof raw === 'string' && raw.trim() === '') return 'Memory is required.';
  const n = parseInteger(raw);
  if (n === null) return 'Memory must be a whole number of MiB.';
  if (n < MIN_MEMORY) return `Memory must be at least ${MIN_MEMORY} MiB.`;
  if (n > MAX_MEMORY) return `Memory must be at most ${MAX_MEMORY} MiB (4 TiB).`;
  return null;
}

export function validateCores(raw: string | number): Check {
  if (typeof raw === 'string' && raw.trim() === '') return 'Cores is required.';
  const n = parseInteger(raw);
  if (n === null) return 'Cores must be a whole number.';
  if (n < MIN_CORES) return `Cores must be at least ${MIN_CORES}.`;
  if (n > MAX_CORES) return `Cores must be at most ${MAX_CORES}.`;
  return null;
}

/** A VM name: DNS labels of letters, digits and hyphens, not starting or ending with a hyphen. */
export function validateVmName(raw: string): Check {
  const name = raw.trim();
  if (name === '') return 'Name is required.';
  if (name !== raw) return 'Name must not start or end with spaces.';
  if (name.length > 63) return 'Name must be at most 63 characters.';
  for (const label of name.split('.')) {
    if (label === '') return 'Name must not have empty parts between dots.';
    if (!/^[A-Za-z0-9-]+$/.test(label)) return 'Use only letters, digits and hyphens (a DNS name).';
    if (label.startsWith('-') || label.endsWith('-')) return 'Name must not start or end with a hyphen.';
  }
  return null;
}

export function validateProxmoxTemplateId(raw: string): Check {
  if (raw.trim() === '') return null;
  const n = parseInteger(raw);
  if (n === null || n < 100 || n > 999_999_999) return 'A Proxmox VMID is a whole number from 100 to 999999999.';
  return null;
}

export function validateBridge(raw: string): Check {
  if (raw.trim() === '') return null;
  if (!/^[A-Za-z0-9_]+$/.test(raw.trim())) return 'A bridge name uses letters, digits and underscores (e.g. vmbr0).';
  return null;
}

export function validateRequired(raw: string, what: string): Check {
  return raw.trim() === '' ? `${what} is required.` : null;
}

export type VarsCheck = { ok: true; value: Record<string, unknown> } | { ok: false; error: string };

/** Parses the Terraform variables textarea: a JSON object whose keys are Terraform variable names. */
export function parseTerraformVars(raw: string): VarsCheck {
  if (raw.trim() === '') return { ok: true, value: {} };
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    return { ok: false, error: `Variables are not valid JSON: ${msg}` };
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    return { ok: false, error: 'Variables must be a JSON object, e.g. {"region": "eu-west"}.' };
  }
  for (const key of Object.keys(v)) {
    if (!/^[A-Za-z_][A-Za-z0-9_-]*$/.test(key)) {
      return { ok: false, error: `"${key}" is not a valid Terraform variable name.` };
    }
  }
  return { ok: true, value: v as Record<string, unknown> };
}

/** Splits a comma/space/newline separated list of names. */
export function parseNameList(raw: string): string[] {
  return raw
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Validates a relative path inside a repository (optional). */
export function validateRepoPath(raw: string): Check {
  const p = raw.trim();
  if (p === '') return null;
  if (p.startsWith('/') || p.split('/').includes('..')) return 'Path must be relative to the repository root, without "..".';
  return null;
}

export function validateGitRef(raw: string): Check {
  const v = raw.trim();
  if (v === '') return 'Version is required (a tag, branch or commit).';
  if (v.startsWith('-') || v.includes('..') || /\s/.test(v)) return 'Version is not a valid git ref.';
  return null;
}
