// Keep a command past the retention period, or let it go again.
import { useId } from 'react';

/**
 * A toggle button whose pressed state is the command's `pinned`. The label stays
 * "Keep (pin)" in both states (a toggle's name must not change with its state, or a screen
 * reader announces "Unpin, pressed"); the state shows as the pressed style and the hint next
 * to it, which the button names as its description.
 */
export function PinToggle({ pinned, busy, onToggle }: { pinned: boolean; busy?: boolean; onToggle: () => void }) {
  const hintId = useId();
  return (
    <span className="pin-toggle">
      <button
        type="button"
        className="btn btn-pin"
        aria-pressed={pinned}
        aria-describedby={hintId}
        onClick={onToggle}
        disabled={busy}
        data-testid="pin-command"
      >
        Keep (pin)
      </button>
      <span id={hintId} className="muted small" data-testid="pin-hint">
        {pinned ? 'Pinned: kept past the retention period. Press again to unpin.' : 'Deleted with its log once past the retention period.'}
      </span>
    </span>
  );
}
