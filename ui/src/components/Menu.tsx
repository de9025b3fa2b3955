// A small accessible action menu ("⋯"): arrow keys move, Esc closes and returns focus,
// clicking outside closes. Disabled items stay visible with the reason as a tooltip.
import { useEffect, useId, useRef, useState } from 'react';

export interface MenuItem {
  label: string;
  onSelect: () => void;
  disabled?: boolean;
  reason?: string;
  danger?: boolean;
}

export function Menu({ label, items }: { label: string; items: MenuItem[] }) {
  const [open, setOpen] = useState(false);
  const [pos, setPos] = useState<{ top: number; left: number }>({ top: 0, left: 0 });
  const btn = useRef<HTMLButtonElement>(null);
  const menu = useRef<HTMLDivElement>(null);
  const id = useId();

  function place() {
    const r = btn.current?.getBoundingClientRect();
    if (!r) return;
    const width = 230;
    const left = Math.max(8, Math.min(r.right - width, window.innerWidth - width - 8));
    setPos({ top: r.bottom + 4, left });
  }

  useEffect(() => {
    if (!open) return;
    const first = menu.current?.querySelector<HTMLElement>('[role=menuitem]');
    first?.focus();
    const onDown = (e: MouseEvent) => {
      if (!menu.current?.contains(e.target as Node) && !btn.current?.contains(e.target as Node)) setOpen(false);
    };
    // Fixed positioning escapes the table's overflow clipping; follow the button when the
    // page scrolls or resizes.
    const follow = () => place();
    document.addEventListener('mousedown', onDown);
    window.addEventListener('resize', follow);
    window.addEventListener('scroll', follow, true);
    return () => {
      document.removeEventListener('mousedown', onDown);
      window.removeEventListener('resize', follow);
      window.removeEventListener('scroll', follow, true);
    };
  }, [open]);

  const onKey = (e: React.KeyboardEvent) => {
    const els = Array.from(menu.current?.querySelectorAll<HTMLElement>('[role=menuitem]') ?? []);
    const i = els.indexOf(document.activeElement as HTMLElement);
    if (e.key === 'Escape') {
      e.stopPropagation();
      setOpen(false);
      btn.current?.focus();
    } else if (e.key === 'ArrowDown') {
      e.preventDefault();
      els[(i + 1) % els.length]?.focus();
    } else if (e.key === 'ArrowUp') {
      e.preventDefault();
      els[(i - 1 + els.length) % els.length]?.focus();
    } else if (e.key === 'Tab') {
      setOpen(false);
    }
  };

  return (
    <span className="menu-wrap">
      <button
        type="button"
        ref={btn}
        className="btn btn-sm menu-btn"
        aria-haspopup="menu"
        aria-expanded={open}
        aria-controls={open ? id : undefined}
        aria-label={label}
        title={label}
        onClick={() => {
          place();
          setOpen(!open);
        }}
      >
        ⋯
      </button>
      {open && (
        <div className="menu" role="menu" id={id} ref={menu} onKeyDown={onKey} style={{ top: pos.top, left: pos.left }}>
          {items.map((it) => (
            <button
              key={it.label}
              type="button"
              role="menuitem"
              className={`menu-item ${it.danger ? 'menu-danger' : ''}`}
              aria-disabled={it.disabled || undefined}
              title={it.disabled ? it.reason : undefined}
              tabIndex={-1}
              onClick={() => {
                if (it.disabled) return;
                setOpen(false);
                it.onSelect();
              }}
            >
              {it.label}
              {it.disabled && it.reason && <span className="menu-reason">{it.reason}</span>}
            </button>
          ))}
        </div>
      )}
    </span>
  );
}
