// The Configure step's "how many" part for new nodes: a count (1–50) and, above 1, a
// preview of the names the VM name pattern makes (`web-{n}` → web-1, web-2, …), skipping
// names existing nodes already have, as the server does (destroyed nodes hold no name;
// case is ignored). An explicit VMID and static address are start values: each node's
// own VMID and address show beside its name.
import { useMemo } from 'react';
import { countOf, expandNames, perNodeValues, previewNames, takenNames, withPerNode, type PerNode } from '../../lib/bulk';
import { useNodes } from '../../lib/queries';
import { Field } from '../../components/ui';
import type { CloneConfig } from './cloneOptions';

/** Each node's VMID and address of a batch of `n` from the Configure step's options. */
export function perNodeOf(n: number, clone: CloneConfig | undefined): PerNode | null {
  if (!clone || n < 2) return null;
  const isStatic = clone.ipMode === 'static';
  return perNodeValues(n, clone.vmId, isStatic ? clone.ipAddress : null, isStatic ? clone.gateway : null);
}

export function BulkNaming({
  count,
  onCount,
  pattern,
  error,
  clone,
}: {
  count: string;
  onCount: (count: string) => void;
  pattern: string;
  error: string | null;
  /** The Proxmox options: a VMID and static address count up per node. */
  clone?: CloneConfig;
}) {
  const nodes = useNodes();
  const n = countOf(count);
  const preview = useMemo(() => (n > 1 ? expandNames(pattern, n, takenNames(nodes.data ?? [])) : null), [n, pattern, nodes.data]);
  const per = perNodeOf(n, clone);
  return (
    <div className="bulk-naming" data-testid="bulk-naming">
      <Field label="How many nodes" error={error} hint="1 – 50. Above 1, the VM name is a pattern: {n} becomes 1, 2, 3, …">
        {(p) => <input {...p} inputMode="numeric" value={count} onChange={(e) => onCount(e.target.value)} data-testid="cfg-count" />}
      </Field>
      {preview && (
        <div className="small" data-testid="bulk-preview" aria-live="polite">
          {preview.error || per?.error ? (
            <span className="err-text">{preview.error || per?.error}</span>
          ) : (
            <>
              <span className="muted">Names: </span>
              {previewNames(withPerNode(preview.names, per))}
            </>
          )}
        </div>
      )}
    </div>
  );
}

/** The Review step's list of the names a bulk provision will create. */
export function BulkReviewNames({ count, pattern, clone }: { count: string; pattern: string; clone?: CloneConfig }) {
  const nodes = useNodes();
  const n = countOf(count);
  const { names, error } = expandNames(pattern, n, takenNames(nodes.data ?? []));
  const per = perNodeOf(n, clone);
  return (
    <div className="notice notice-info" data-testid="review-bulk-names">
      <strong>{n} nodes</strong>, provisioned in parallel up to the hypervisor’s concurrency limit:{' '}
      {error || per?.error ? <span className="err-text">{error || per?.error}</span> : previewNames(withPerNode(names, per), 12)}
    </div>
  );
}
