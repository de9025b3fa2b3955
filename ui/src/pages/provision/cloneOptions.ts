// The Proxmox clone options of the Configure step as form strings, their checks (the same
// limits the control plane applies), the request body they make, and the mapping from the
// field a failed command names (`error.details.field`, protocol names) to the form field.
import type { CloneOptions, Template } from '../../lib/types';

export interface CloneConfig {
  storage: string;
  /** '' = Proxmox's default (linked, full with a storage), 'full' or 'linked'. */
  cloneMode: '' | 'full' | 'linked';
  diskSizeGib: string;
  vmId: string;
  ciUser: string;
  /** One OpenSSH public key per line. */
  sshKeys: string;
  ipMode: '' | 'dhcp' | 'static';
  ipAddress: string;
  gateway: string;
  vlanTag: string;
  pool: string;
  /** Comma- or space-separated. */
  tags: string;
  onboot: boolean;
  /**
   * The template's clone defaults filled in by `withTemplateDefaults`: a field that had one
   * and is now empty (or unchecked) is sent as an explicit clear, or the server would
   * apply the default again.
   */
  defaults?: CloneOptions | null;
}

export type CloneField = Exclude<keyof CloneConfig, 'cloneMode' | 'ipMode' | 'onboot'> | 'cloneMode' | 'onboot';
export type CloneErrors = Partial<Record<keyof CloneConfig, string | null>>;

export const EMPTY_CLONE: CloneConfig = {
  storage: '',
  cloneMode: '',
  diskSizeGib: '',
  vmId: '',
  ciUser: '',
  sshKeys: '',
  ipMode: '',
  ipAddress: '',
  gateway: '',
  vlanTag: '',
  pool: '',
  tags: '',
  onboot: false,
};

/** The form field for a protocol field name (`details.field` of a command error). */
export const FIELD_OF: Record<string, keyof CloneConfig | 'name'> = {
  storage: 'storage',
  full: 'cloneMode',
  disk_size_gib: 'diskSizeGib',
  vm_id: 'vmId',
  ci_user: 'ciUser',
  ssh_keys: 'sshKeys',
  ip_config: 'ipAddress',
  vlan_tag: 'vlanTag',
  pool: 'pool',
  tags: 'tags',
  onboot: 'onboot',
  name: 'name',
};

/** The form field a failed command points at, if any. */
export function fieldOfError(details: unknown): keyof CloneConfig | 'name' | null {
  if (!details || typeof details !== 'object') return null;
  const f = (details as Record<string, unknown>).field;
  return typeof f === 'string' ? (FIELD_OF[f] ?? null) : null;
}

const ID = /^[A-Za-z][A-Za-z0-9\-_.]{0,63}$/;
const POOL = /^[A-Za-z0-9\-_.]{1,64}$/;
const USER = /^[a-z_][a-z0-9_-]{0,31}$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_+.-]*$/;
const KEY_TYPES = ['ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'sk-ssh-ed25519@openssh.com', 'sk-ecdsa-sha2-nistp256@openssh.com', 'ssh-dss'];

function ipv4(s: string): number[] | null {
  const p = s.split('.');
  if (p.length !== 4 || !p.every((x) => /^\d{1,3}$/.test(x) && Number(x) <= 255)) return null;
  return p.map(Number);
}

function intIn(raw: string, min: number, max: number): boolean {
  return /^\d+$/.test(raw.trim()) && Number(raw) >= min && Number(raw) <= max;
}

export function splitList(raw: string): string[] {
  return raw
    .split(/[\s,;]+/)
    .map((t) => t.trim())
    .filter(Boolean);
}

export function sshKeyLines(raw: string): string[] {
  return raw
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
}

/** One message per field that is wrong (empty fields are fine: they keep Proxmox's default). */
export function cloneErrors(c: CloneConfig): CloneErrors {
  const e: CloneErrors = {};
  if (c.storage.trim() && !ID.test(c.storage.trim())) e.storage = 'A Proxmox storage id: a letter, then letters, digits, - _ .';
  if (c.storage.trim() && c.cloneMode === 'linked') e.cloneMode = 'A linked clone stays on the template’s storage: choose a full clone or no storage.';
  if (c.diskSizeGib.trim() && !intIn(c.diskSizeGib, 1, 65536)) e.diskSizeGib = 'Disk size: a whole number of GiB, 1 – 65536.';
  if (c.vmId.trim() && !intIn(c.vmId, 100, 999999999)) e.vmId = 'VMID: a whole number, 100 – 999999999.';
  if (c.ciUser.trim() && !USER.test(c.ciUser.trim())) e.ciUser = 'A Linux user name: lower-case letters, digits, _ and - (max 32).';
  for (const k of sshKeyLines(c.sshKeys)) {
    const [type, blob] = k.split(/\s+/);
    if (!KEY_TYPES.includes(type) || !blob || !/^[A-Za-z0-9+/]+=*$/.test(blob) || !blob.startsWith('AAAA')) {
      e.sshKeys = `Not an OpenSSH public key: “${k.slice(0, 40)}${k.length > 40 ? '…' : ''}” (expected e.g. ssh-ed25519 AAAA… me@host).`;
      break;
    }
  }
  if (c.ipMode === 'static') {
    const [addr, prefix] = c.ipAddress.trim().split('/');
    const ip = ipv4(addr ?? '');
    if (!ip || !prefix || !intIn(prefix, 1, 32)) e.ipAddress = 'An IPv4 address with its prefix, e.g. 10.0.0.5/24.';
    else if (c.gateway.trim()) {
      const gw = ipv4(c.gateway.trim());
      const bits = Number(prefix);
      const net = (a: number[]) => (((a[0] << 24) | (a[1] << 16) | (a[2] << 8) | a[3]) >>> 0) >>> (32 - bits);
      if (!gw) e.gateway = 'The gateway must be an IPv4 address.';
      else if (bits < 32 && net(gw) !== net(ip)) e.gateway = `The gateway must be inside ${c.ipAddress.trim()}.`;
    }
  }
  if (c.vlanTag.trim() && !intIn(c.vlanTag, 1, 4094)) e.vlanTag = 'VLAN tag: 1 – 4094.';
  if (c.pool.trim() && !POOL.test(c.pool.trim())) e.pool = 'A pool id: letters, digits, - _ .';
  const bad = splitList(c.tags).find((t) => !TAG.test(t));
  if (bad) e.tags = `“${bad}” is not a Proxmox tag (letters, digits, _, then also - + .).`;
  return e;
}

/**
 * The request body for the options that are set; undefined when none is. A field the
 * template has a default for is always sent: emptied, it clears the default (`''`, `0`,
 * `[]`, `onboot: false`; "Proxmox default" clone type is linked unless a storage is set).
 */
export function cloneOptionsOf(c: CloneConfig): CloneOptions | undefined {
  const o: CloneOptions = {};
  const d: CloneOptions = c.defaults ?? {};
  if (c.storage.trim()) o.storage = c.storage.trim();
  else if (d.storage) o.storage = '';
  if (c.cloneMode) o.full = c.cloneMode === 'full';
  else if (d.full != null) o.full = !!o.storage;
  if (c.diskSizeGib.trim()) o.diskSizeGib = Number(c.diskSizeGib);
  else if (d.diskSizeGib) o.diskSizeGib = 0;
  if (c.vmId.trim()) o.vmId = Number(c.vmId);
  if (c.ciUser.trim()) o.ciUser = c.ciUser.trim();
  else if (d.ciUser) o.ciUser = '';
  const keys = sshKeyLines(c.sshKeys);
  if (keys.length) o.sshKeys = keys;
  else if (d.sshKeys?.length) o.sshKeys = [];
  if (c.ipMode === 'dhcp') o.ipConfig = { mode: 'dhcp' };
  if (c.ipMode === 'static') o.ipConfig = { mode: 'static', address: c.ipAddress.trim(), ...(c.gateway.trim() ? { gateway: c.gateway.trim() } : {}) };
  if (c.vlanTag.trim()) o.vlanTag = Number(c.vlanTag);
  else if (d.vlanTag) o.vlanTag = 0;
  if (c.pool.trim()) o.pool = c.pool.trim();
  else if (d.pool) o.pool = '';
  const tags = splitList(c.tags).map((t) => t.toLowerCase());
  if (tags.length) o.tags = tags;
  else if (d.tags?.length) o.tags = [];
  if (c.onboot) o.onboot = true;
  else if (d.onboot) o.onboot = false;
  return Object.keys(o).length ? o : undefined;
}

/** The form with a template's defaults filled into the fields still empty. */
export function withTemplateDefaults(c: CloneConfig, t: Template): CloneConfig {
  const d = t.cloneDefaults;
  if (!d) return c;
  const fill = (cur: string, v: string | number | null | undefined) => (cur.trim() || v == null ? cur : String(v));
  const ip = d.ipConfig;
  return {
    ...c,
    storage: fill(c.storage, d.storage),
    cloneMode: c.cloneMode || (d.full == null ? '' : d.full ? 'full' : 'linked'),
    diskSizeGib: fill(c.diskSizeGib, d.diskSizeGib),
    ciUser: fill(c.ciUser, d.ciUser),
    sshKeys: c.sshKeys.trim() || !d.sshKeys?.length ? c.sshKeys : d.sshKeys.join('\n'),
    ipMode: c.ipMode || (ip ? ip.mode : ''),
    ipAddress: fill(c.ipAddress, ip && ip.mode === 'static' ? ip.address : null),
    gateway: fill(c.gateway, ip && ip.mode === 'static' ? ip.gateway : null),
    vlanTag: fill(c.vlanTag, d.vlanTag),
    pool: fill(c.pool, d.pool),
    tags: c.tags.trim() || !d.tags?.length ? c.tags : d.tags.join(', '),
    onboot: c.onboot || !!d.onboot,
    defaults: d,
  };
}

/** The form filled from a command's `params.clone_options` (protocol names), for "Change settings". */
export function cloneConfigFromParams(params: unknown): CloneConfig | null {
  if (!params || typeof params !== 'object') return null;
  const o = (params as Record<string, unknown>).clone_options as Record<string, unknown> | undefined;
  if (!o || typeof o !== 'object') return null;
  const str = (v: unknown) => (v == null ? '' : String(v));
  const ip = o.ip_config as Record<string, unknown> | undefined;
  return {
    storage: str(o.storage),
    cloneMode: o.full === true ? 'full' : o.full === false ? 'linked' : '',
    diskSizeGib: str(o.disk_size_gib),
    vmId: str(o.vm_id),
    ciUser: str(o.ci_user),
    sshKeys: Array.isArray(o.ssh_keys) ? o.ssh_keys.join('\n') : '',
    ipMode: ip?.mode === 'dhcp' ? 'dhcp' : ip?.mode === 'static' ? 'static' : '',
    ipAddress: str(ip?.address),
    gateway: str(ip?.gateway),
    vlanTag: str(o.vlan_tag),
    pool: str(o.pool),
    tags: Array.isArray(o.tags) ? o.tags.join(', ') : '',
    onboot: o.onboot === true,
  };
}

/** One line of the Review step's clone-options summary. */
export interface CloneSummaryItem {
  field: keyof CloneConfig;
  label: string;
  value: string;
}

/**
 * What the Review step shows of the clone options: exactly what the request will send
 * ([`cloneOptionsOf`]), in words; an empty list means Proxmox's defaults.
 */
export function cloneSummary(c: CloneConfig): CloneSummaryItem[] {
  const o = cloneOptionsOf(c);
  if (!o) return [];
  const out: CloneSummaryItem[] = [];
  if (o.storage) out.push({ field: 'storage', label: 'Target storage', value: o.storage });
  if (o.full != null || o.storage) {
    const full = o.full ?? true;
    out.push({ field: 'cloneMode', label: 'Clone type', value: full ? (o.full == null ? 'Full clone (a target storage needs one)' : 'Full clone') : 'Linked clone' });
  }
  if (o.diskSizeGib) out.push({ field: 'diskSizeGib', label: 'Disk size', value: `${o.diskSizeGib} GiB (grown after the clone if the template’s disk is smaller)` });
  if (o.vmId != null) out.push({ field: 'vmId', label: 'VMID', value: String(o.vmId) });
  if (o.ciUser) out.push({ field: 'ciUser', label: 'Cloud-init user', value: o.ciUser });
  if (o.sshKeys?.length) {
    const comments = o.sshKeys.map((k) => k.split(/\s+/).slice(2).join(' ') || k.split(/\s+/)[0]);
    out.push({ field: 'sshKeys', label: 'SSH keys', value: `${o.sshKeys.length} key${o.sshKeys.length === 1 ? '' : 's'}: ${comments.join(', ')}` });
  }
  if (o.ipConfig) {
    const ip = o.ipConfig;
    out.push({ field: 'ipAddress', label: 'IP address', value: ip.mode === 'dhcp' ? 'DHCP' : `${ip.address}${ip.gateway ? `, gateway ${ip.gateway}` : ', no gateway'}` });
  }
  if (o.vlanTag) out.push({ field: 'vlanTag', label: 'VLAN tag', value: String(o.vlanTag) });
  if (o.pool) out.push({ field: 'pool', label: 'Pool', value: o.pool });
  if (o.tags?.length) out.push({ field: 'tags', label: 'Proxmox tags', value: o.tags.join(', ') });
  if (o.onboot) out.push({ field: 'onboot', label: 'Start at boot', value: 'Yes' });
  return out;
}
