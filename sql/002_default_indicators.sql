-- The default indicator set (SPEC section 8), on every timeframe, only when the
-- instance table is empty: a user's own configuration is never touched.
DO $$
DECLARE
    tf   text;
    spec jsonb;
    new_id integer;
    p    record;
BEGIN
    IF EXISTS (SELECT 1 FROM indicator_instances_v4) THEN
        RETURN;
    END IF;
    FOREACH tf IN ARRAY ARRAY['m1', 'm5', 'm15'] LOOP
        FOR spec IN SELECT * FROM jsonb_array_elements('[
            {"indicator": "ema",        "params": {"length": "9"}},
            {"indicator": "ema",        "params": {"length": "21"}},
            {"indicator": "ema",        "params": {"length": "50"}},
            {"indicator": "ema",        "params": {"length": "200"}},
            {"indicator": "sma",        "params": {"length": "20"}},
            {"indicator": "rsi",        "params": {"length": "14"}},
            {"indicator": "macd",       "params": {"fast": "12", "slow": "26", "signal": "9"}},
            {"indicator": "bbands",     "params": {"length": "20", "lower_std": "2", "upper_std": "2"}},
            {"indicator": "atr",        "params": {"length": "14"}},
            {"indicator": "adx",        "params": {"length": "14"}},
            {"indicator": "stoch",      "params": {"k": "14", "d": "3", "smooth_k": "3"}},
            {"indicator": "supertrend", "params": {"length": "10", "multiplier": "3"}},
            {"indicator": "vwap",       "params": {"anchor": "D"}},
            {"indicator": "obv",        "params": {}}
        ]'::jsonb) LOOP
            INSERT INTO indicator_instances_v4 (indicator, timeframe)
            VALUES (spec->>'indicator', tf)
            RETURNING id INTO new_id;
            FOR p IN SELECT key, value FROM jsonb_each_text(spec->'params') LOOP
                INSERT INTO indicator_parameters_v4 (instance_id, param, value)
                VALUES (new_id, p.key, p.value);
            END LOOP;
        END LOOP;
    END LOOP;
END
$$;
