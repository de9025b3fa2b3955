import { STEPS, STEP_LABEL, type Step } from './provisionReducer';

/** The wizard's step list; reachable steps other than the current one are buttons. */
export function Stepper({ step, reachable, onGo }: { step: Step; reachable: (s: Step) => boolean; onGo: (s: Step) => void }) {
  const idx = STEPS.indexOf(step);
  return (
    <ol className="stepper" aria-label="Steps">
      {STEPS.map((s, i) => {
        const state = i < idx ? 'done' : i === idx ? 'current' : 'todo';
        const can = s !== step && reachable(s);
        return (
          <li key={s} className={`step step-${state}`} aria-current={state === 'current' ? 'step' : undefined} data-step={s}>
            {can ? (
              <button type="button" className="step-btn" onClick={() => onGo(s)}>
                <span className="step-no">{state === 'done' ? '✓' : i + 1}</span>
                <span className="step-label">{STEP_LABEL[s]}</span>
              </button>
            ) : (
              <span className="step-btn">
                <span className="step-no">{state === 'done' ? '✓' : i + 1}</span>
                <span className="step-label">{STEP_LABEL[s]}</span>
              </span>
            )}
          </li>
        );
      })}
    </ol>
  );
}
