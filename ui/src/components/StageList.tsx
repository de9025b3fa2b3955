import { useNow } from '../lib/hooks';
import { mergeStages, stageLabel } from '../lib/stages';
import { durationBetween, formatDuration } from '../lib/time';
import type { Stage } from '../lib/types';

const ICON: Record<string, string> = {
  pending: '○',
  running: '◐',
  completed: '✓',
  failed: '✕',
  skipped: '–',
};

/** Ordered stages with a state icon, duration and message. */
export function StageList({ type, stages, failed }: { type: string; stages: Stage[] | undefined; failed?: string | null }) {
  const now = useNow(1000);
  const list = mergeStages(type, stages);
  if (list.length === 0) return <p className="muted small">This command type reports no stages.</p>;
  return (
    <ol className="stages" data-testid="stages">
      {list.map((s) => {
        const state = s.state === 'running' && failed === s.name ? 'failed' : s.state;
        const d = s.startedAt ? durationBetween(s.startedAt, s.finishedAt, now) : null;
        return (
          <li key={s.name} className={`stage stage-${state}`} data-stage={s.name} data-state={state}>
            <span className="stage-icon" aria-hidden="true">
              {ICON[state] ?? '○'}
            </span>
            <span className="stage-name">{stageLabel(s.name)}</span>
            <span className="sr-only">: {state}</span>
            <span className="stage-dur">{d !== null ? formatDuration(d) : ''}</span>
            {s.message && <span className="stage-msg">{s.message}</span>}
          </li>
        );
      })}
    </ol>
  );
}
