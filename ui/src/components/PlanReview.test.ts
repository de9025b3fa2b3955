// The plan review's markup: a destroy plan says so above Terraform's line and lists every
// resource under Destroy; a normal plan has no such notice.
import { describe, expect, it } from 'vitest';
import { createElement } from 'react';
import { renderToString } from 'react-dom/server';
import { planSummary } from '../lib/terraform';
import { PlanReview } from './PlanReview';

const render = (result: unknown) => renderToString(createElement(PlanReview, { summary: planSummary(result)! }));

describe('PlanReview', () => {
  it('labels a destroy plan and lists its resources under Destroy', () => {
    const html = render({ add: 0, change: 0, destroy: 1, resources: [{ address: 'null_resource.announce', action: 'delete' }], plan_sha256: 'ab'.repeat(32), mode: 'destroy' });
    expect(html).toContain('data-mode="destroy"');
    expect(html).toMatch(/data-testid="plan-mode"[^>]*>[\s\S]*Destroy plan\.[\s\S]*destroys every resource listed below/);
    expect(html).toMatch(/data-testid="plan-group-delete"[\s\S]*Destroy[\s\S]*data-action="delete" data-address="null_resource.announce"/);
    expect(html).toContain('Plan: 0 to add, 0 to change, 1 to destroy.');
    const none = render({ add: 0, change: 0, destroy: 0, resources: [], plan_sha256: 'ab'.repeat(32), mode: 'destroy' });
    expect(none).toContain('no resources to destroy');
    expect(none).toContain('No objects need to be destroyed.');
  });
  it('shows a normal plan without the destroy notice', () => {
    const html = render({ add: 1, change: 0, destroy: 0, resources: [{ address: 'null_resource.announce', action: 'create' }], plan_sha256: 'ab'.repeat(32) });
    expect(html).toContain('data-mode="normal"');
    expect(html).not.toContain('data-testid="plan-mode"');
  });
});
