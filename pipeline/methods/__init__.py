"""The methods the stages apply: multi-scale CAMs, the dense CRF, affinities and random walks,
Self-Regulation losses and exits, mixed supervision (teacher-student), the pixel losses."""
