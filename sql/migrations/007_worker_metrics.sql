-- Where each live worker serves its Prometheus metrics (NULL: it serves none), for `dev status` and scrapers.
ALTER TABLE workers ADD COLUMN metrics_url text;
