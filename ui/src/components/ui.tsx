// Small shared presentational pieces.
import { useEffect, useId, useRef, useState, type ReactNode } from 'react';
import { formatTimestamp, relativeTime } from '../lib/time';
import { useNow } from '../lib/hooks';
import { NODE_STATUS_LABEL, type AgentStatus, type CommandStatus, type NodeStatus, type StageState } from '../lib/types';

type Tone = 'ok' | 'info' | 'muted' | 'bad' | 'warn' | 'destroying' | 'gone' | 'lost';

// Exhaustive over the API's enums (generated types): a new status fails the typecheck here.
const COMMAND_TONE = {
  queued: 'muted',
  dispatched: 'info',
  running: 'info',
  succeeded: 'ok',
  failed: 'bad',
  cancelled: 'warn',
  timed_out: 'bad',
} as const satisfies Record<CommandStatus, Tone>;

/** Node statuses: a running VM is good news (green), unlike a running command. */
const NODE_TONE = {
  pending_provision: 'muted',
  provisioning: 'info',
  running: 'ok',
  stopped: 'warn',
  failed: 'bad',
  destroying: 'destroying',
  destroyed: 'gone',
  missing: 'lost',
} as const satisfies Record<NodeStatus, Tone>;

const AGENT_TONE = { online: 'ok', offline: 'muted' } as const satisfies Record<AgentStatus, Tone>;

const STAGE_TONE = {
  pending: 'muted',
  running: 'info',
  completed: 'ok',
  failed: 'bad',
  skipped: 'muted',
} as const satisfies Record<StageState, Tone>;

const PILL_TONE: Record<string, Tone> = { ...STAGE_TONE, ...AGENT_TONE, ...COMMAND_TONE };

const PILL_LABEL: Record<string, string> = {
  timed_out: 'timed out',
};

const LIVE = new Set<string>(['running', 'dispatched', 'provisioning', 'destroying', 'online']);

/** A coloured status pill (command, agent or stage); the running-ish states get a pulsing dot. */
export function StatusPill({
  status,
  title,
  tone: toneOverride,
  label,
}: {
  status: CommandStatus | AgentStatus | StageState | NodeStatus;
  title?: string;
  tone?: Tone;
  label?: string;
}) {
  const tone = toneOverride ?? PILL_TONE[status] ?? 'muted';
  return (
    <span className={`pill pill-${tone}`} title={title} data-status={status}>
      <span className={`dot${LIVE.has(status) ? ' dot-live' : ''}`} aria-hidden="true" />
      {label ?? PILL_LABEL[status] ?? status}
    </span>
  );
}

export function NodeStatusPill({ status, title }: { status: NodeStatus; title?: string }) {
  return <StatusPill status={status} title={title} tone={NODE_TONE[status]} label={NODE_STATUS_LABEL[status]} />;
}

export function RelTime({ ts, now }: { ts: string | null | undefined; now?: number }) {
  const tick = useNow(1000);
  return (
    <time dateTime={ts ?? undefined} title={formatTimestamp(ts)}>
      {relativeTime(ts, now ?? tick)}
    </time>
  );
}

export function ErrorBox({ title, children }: { title?: string; children: ReactNode }) {
  return (
    <div className="errorbox" role="alert">
      {title && <strong>{title}</strong>}
      <div>{children}</div>
    </div>
  );
}

export function Notice({ children, tone = 'info' }: { children: ReactNode; tone?: 'info' | 'warn' }) {
  return <div className={`notice notice-${tone}`}>{children}</div>;
}

export function Spinner({ label = 'Loading' }: { label?: string }) {
  return (
    <span className="spinner-wrap" role="status">
      <span className="spinner" aria-hidden="true" />
      <span className="sr-only">{label}</span>
    </span>
  );
}

export function Empty({ children }: { children: ReactNode }) {
  return <div className="empty">{children}</div>;
}

export function ProgressBar({ percent, tone, label = 'Progress' }: { percent: number; tone?: 'ok' | 'bad' | 'info'; label?: string }) {
  const p = Math.max(0, Math.min(100, Math.round(percent)));
  return (
    <div
      className={`progress progress-${tone ?? 'info'}`}
      role="progressbar"
      aria-label={label}
      aria-valuenow={p}
      aria-valuemin={0}
      aria-valuemax={100}
    >
      <div className="progress-fill" style={{ width: `${p}%` }} />
      <span className="progress-label" aria-hidden="true">
        <span>{p}%</span>
      </span>
    </div>
  );
}

/** Copies `text` to the clipboard; falls back to selecting a hidden textarea. */
export async function copyText(text: string): Promise<boolean> {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch {
    /* fall through */
  }
  const ta = document.createElement('textarea');
  ta.value = text;
  ta.setAttribute('readonly', '');
  ta.style.position = 'fixed';
  ta.style.opacity = '0';
  document.body.appendChild(ta);
  ta.select();
  let ok: boolean;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  ta.remove();
  return ok;
}

export function CopyButton({ text, label = 'Copy', className }: { text: string; label?: string; className?: string }) {
  const [state, setState] = useState<'idle' | 'ok' | 'fail'>('idle');
  useEffect(() => {
    if (state === 'idle') return;
    const t = setTimeout(() => setState('idle'), 1800);
    return () => clearTimeout(t);
  }, [state]);
  return (
    <button
      type="button"
      className={`btn btn-sm ${className ?? ''}`}
      onClick={async () => setState((await copyText(text)) ? 'ok' : 'fail')}
      aria-live="polite"
    >
      {state === 'ok' ? 'Copied ✓' : state === 'fail' ? 'Select & copy manually' : label}
    </button>
  );
}

interface FieldProps {
  label: string;
  error?: string | null;
  hint?: ReactNode;
  children: (props: { id: string; 'aria-invalid': boolean; 'aria-describedby'?: string }) => ReactNode;
  className?: string;
}

/** A labelled form field with an inline error message wired up for screen readers. */
export function Field({ label, error, hint, children, className }: FieldProps) {
  const id = useId();
  const errId = `${id}-err`;
  const hintId = `${id}-hint`;
  const describedBy = [error ? errId : null, hint ? hintId : null].filter(Boolean).join(' ') || undefined;
  return (
    <div className={`field ${error ? 'field-invalid' : ''} ${className ?? ''}`}>
      <label htmlFor={id}>{label}</label>
      {children({ id, 'aria-invalid': !!error, 'aria-describedby': describedBy })}
      {hint && !error && (
        <div className="field-hint" id={hintId}>
          {hint}
        </div>
      )}
      {error && (
        <div className="field-error" id={errId}>
          {error}
        </div>
      )}
    </div>
  );
}

export function JsonView({ value }: { value: unknown }) {
  return <pre className="json">{JSON.stringify(value, null, 2)}</pre>;
}

export function shortId(id: string | null | undefined): string {
  if (!id) return '–';
  return id.length > 8 ? id.slice(0, 8) : id;
}

/** Focuses the element once on mount. */
export function useAutoFocus<T extends HTMLElement>() {
  const ref = useRef<T>(null);
  useEffect(() => {
    ref.current?.focus();
  }, []);
  return ref;
}
