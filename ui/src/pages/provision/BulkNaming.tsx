// The Configure step's "how many" part for new nodes: a count (1–50) and, above 1, a
// preview of the names the VM name pattern makes (`web-{n}` → web-1, web-2, …), skipping
// names existing nodes already have, as the server does.
import { useMemo } from 'react';
import { countOf, expandNames, previewNames } from '../../lib/bulk';
import { useNodes } from '../../lib/queries';
import { Field } from '../../components/ui';

export function BulkNaming({
  count,
  onCount,
  pattern,
  error,
}: {
  count: string;
  onCount: (count: string) => void;
  pattern: string;
  error: string | null;
}) {
  const nodes = useNodes();
  const n = countOf(count);
  const preview = useMemo(
    () => (n > 1 ? expandNames(pattern, n, (nodes.data ?? []).map((x) => x.name)) : null),
    [n, pattern, nodes.data],
  );
  return (
    <div className="bulk-naming" data-testid="bulk-naming">
      <Field label="How many nodes" error={error} hint="1 – 50. Above 1, the VM name is a pattern: {n} becomes 1, 2, 3, …">
        {(p) => <input {...p} inputMode="numeric" value={count} onChange={(e) => onCount(e.target.value)} data-testid="cfg-count" />}
      </Field>
      {preview && (
        <div className="small" data-testid="bulk-preview" aria-live="polite">
          {preview.error ? (
            <span className="err-text">{preview.error}</span>
          ) : (
            <>
              <span className="muted">Names: </span>
              {previewNames(preview.names)}
            </>
          )}
        </div>
      )}
    </div>
  );
}

/** The Review step's list of the names a bulk provision will create. */
export function BulkReviewNames({ count, pattern }: { count: string; pattern: string }) {
  const nodes = useNodes();
  const n = countOf(count);
  const { names, error } = expandNames(pattern, n, (nodes.data ?? []).map((x) => x.name));
  return (
    <div className="notice notice-info" data-testid="review-bulk-names">
      <strong>{n} nodes</strong>, provisioned in parallel up to the hypervisor’s concurrency limit:{' '}
      {error ? <span className="err-text">{error}</span> : previewNames(names, 12)}
    </div>
  );
}
