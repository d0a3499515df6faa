-- Every `runledger verify` run: what it checked and whether it was intact, for the integrity dashboard and its
-- alerts (the findings themselves are in the command's output).
CREATE TABLE verifications (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    check_name  text NOT NULL CHECK (check_name IN ('chains', 'projection', 'log', 'checkpoint')),
    finished_at timestamptz NOT NULL DEFAULT now(),
    seconds     double precision NOT NULL,
    events      bigint NOT NULL,
    findings    integer NOT NULL,
    codes       jsonb NOT NULL  -- findings by code
);
CREATE INDEX verifications_check ON verifications (check_name, finished_at);

DO $$
BEGIN
    EXECUTE format('GRANT SELECT ON %1$I.verifications TO runledger_worker', current_schema());
END $$;
