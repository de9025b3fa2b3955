// The log of one command on its own (#/commands/<id>/log), filling the window: opened from
// the command page's "Open in new window" so the log can sit beside other work. Same live
// stream and viewer as the command page; the app's normal sign-in applies.
import { useEffect } from 'react';
import { useLiveCommand } from '../lib/hooks';
import { isTerminal } from '../lib/types';
import { LogViewer } from '../components/LogViewer';
import { ErrorBox, Spinner, StatusPill, shortId } from '../components/ui';

export function CommandLog({ id }: { id: string }) {
  const live = useLiveCommand(id);
  const cmd = live.command;

  useEffect(() => {
    document.title = cmd ? `Log · ${cmd.type} ${shortId(cmd.id)} · Trellis` : 'Log · Trellis';
  }, [cmd]);

  return (
    <main className="log-window" data-testid="log-window" data-status={cmd?.status}>
      <header className="log-window-head">
        <h1>
          Log of {cmd ? `${cmd.type} ` : 'command '}
          <span className="mono">{shortId(id)}</span>
        </h1>
        {cmd && <StatusPill status={cmd.status} />}
        <a href={`#/commands/${encodeURIComponent(id)}`}>Command details</a>
      </header>
      {!cmd ? (
        <div className="card-pad">{live.error ? <ErrorBox title="Cannot load command">{live.error}</ErrorBox> : <Spinner />}</div>
      ) : (
        <LogViewer buffer={live.logs} height="fill" live={!isTerminal(cmd.status)} fileName={`${cmd.type}-${cmd.id}.log`} commandId={cmd.id} />
      )}
    </main>
  );
}
