// The two lifecycle confirmations of the Nodes page: Destroy (typed name) and Forget.
import { useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useMutations } from '../lib/queries';
import type { VmNode } from '../lib/types';
import { Modal } from '../components/Modal';
import { ErrorBox, Field, Notice } from '../components/ui';
import { destroyConfirmHint, destroyConfirmed } from './nodeActions';

function vmLabel(n: VmNode): string {
  return `VM ${n.vmId ?? '?'}${n.vmNode ? ` on ${n.vmNode}` : ''}`;
}

/** Destroy: deletes the VM and its disks; the admin types the node's name to enable the button. */
export function DestroyDialog({ node, onClose, onStarted }: { node: VmNode; onClose: () => void; onStarted?: (commandId: string | null) => void }) {
  const m = useMutations();
  const [typed, setTyped] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const ok = destroyConfirmed(typed, node.name);
  const hint = destroyConfirmHint(typed, node.name);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!ok || busy) return;
    setBusy(true);
    setError(null);
    try {
      const r = await m.destroyNode(node.id, typed);
      onStarted?.(r.commandId ?? null);
      onClose();
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Modal
      title={`Destroy ${node.name}?`}
      onClose={onClose}
      testId="destroy-dialog"
      footer={
        <>
          <button type="button" className="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" form="destroy-form" className="btn btn-danger" disabled={!ok || busy} data-testid="destroy-submit">
            {busy ? 'Starting…' : 'Destroy VM'}
          </button>
        </>
      }
    >
      <form id="destroy-form" onSubmit={submit} noValidate>
        <p>
          This stops <strong>{vmLabel(node)}</strong>
          {node.ipAddress ? ` (${node.ipAddress})` : ''} and <strong>deletes it with its disks</strong> in Proxmox. This cannot be undone.
        </p>
        <p className="muted">The Trellis record is kept as <em>destroyed</em>, with its command history; delete it afterwards if you no longer need it.</p>
        {node.status === 'missing' && <Notice tone="warn">Proxmox no longer lists this VM; destroying it only marks the record destroyed.</Notice>}
        <Field label={`Type the node name, ${node.name}, to confirm`} error={hint}>
          {(p) => (
            <input
              {...p}
              value={typed}
              onChange={(e) => setTyped(e.target.value)}
              autoComplete="off"
              spellCheck={false}
              data-autofocus
              data-testid="destroy-confirm-input"
            />
          )}
        </Field>
        {error && <ErrorBox title="Could not destroy">{error}</ErrorBox>}
      </form>
    </Modal>
  );
}

/** Forget: drops the record and keeps the VM in Proxmox, untracked. */
export function ForgetDialog({ node, onClose }: { node: VmNode; onClose: () => void }) {
  const m = useMutations();
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const forget = async () => {
    setBusy(true);
    setError(null);
    try {
      await m.forgetNode(node.id);
      onClose();
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Modal
      title={`Forget ${node.name}?`}
      onClose={onClose}
      testId="forget-dialog"
      footer={
        <>
          <button type="button" className="btn" onClick={onClose} data-autofocus>
            Cancel
          </button>
          <button type="button" className="btn btn-danger" onClick={forget} disabled={busy} data-testid="forget-submit">
            {busy ? 'Forgetting…' : 'Forget node'}
          </button>
        </>
      }
    >
      <Notice tone="warn">
        <strong data-testid="forget-explainer">The VM stays in Proxmox; Trellis stops tracking it.</strong>
      </Notice>
      <p>
        The record of <strong>{node.name}</strong> is removed from Trellis. {vmLabel(node)} keeps running (or stays stopped) and is not deleted; it
        shows on its hypervisor as an untracked VM made by Trellis. Delete it in Proxmox yourself when you no longer need it.
      </p>
      {error && <ErrorBox title="Could not forget">{error}</ErrorBox>}
    </Modal>
  );
}
