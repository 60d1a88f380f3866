"""Split invariants over random catalogues that grow in several rounds (property tests)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.schema import SPLITS, Base, Image, Patient, Source
from xray_core.data.split import assign_splits, choose_split, majority_label

RATIOS = (0.7, 0.15, 0.15)

# A round: a list of (patient number, label, image count). Patients may reappear in later rounds.
rounds_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["normal", "pneumonia", "covid"]),
                       st.integers(1, 3)), min_size=1, max_size=25),
    min_size=1, max_size=4,
)


_PG_ENGINE = []
_PG_SESSIONS: list = []


def _fresh() -> Session:
    """An empty catalogue: in-memory SQLite, or (PostgreSQL lane) one database with fresh tables."""
    from conftest import POSTGRES_URL, fresh_database_url

    if POSTGRES_URL:
        if not _PG_ENGINE:
            _PG_ENGINE.append(create_engine(fresh_database_url(None)[0]))
        engine = _PG_ENGINE[0]
        while _PG_SESSIONS:
            _PG_SESSIONS.pop().close()  # release the previous example's locks before dropping tables
        Base.metadata.drop_all(engine)
    else:
        engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    session = Session(engine)
    _PG_SESSIONS.append(session)
    session.add(Source(id=1, kind="test", path="/x"))
    session.flush()
    return session


def _add_round(session: Session, rnd, counter: list[int]) -> None:
    labels_of = {p.patient_id: None for p in session.scalars(select(Patient))}
    for pnum, label, n in rnd:
        pid = f"p{pnum}"
        if pid not in labels_of and session.get(Patient, pid) is None:
            session.add(Patient(patient_id=pid, id_source="manifest"))
            session.flush()
            labels_of[pid] = label
        for _ in range(n):
            counter[0] += 1
            session.add(Image(sha256=f"{counter[0]:064x}", stored_path="s", label=label, patient_id=pid,
                              width=64, height=64, bit_depth=8, format="png", phash=0,
                              original_name="f", source_id=1))
    session.flush()


def _snapshot(session: Session) -> dict[str, str]:
    return dict(session.execute(select(Patient.patient_id, Patient.split)).all())


def _test_images(session: Session) -> set[str]:
    return set(session.scalars(select(Image.sha256).join(Patient).where(Patient.split == "test")))


@hsettings(max_examples=40, deadline=None)
@given(rounds=rounds_strategy, seed=st.integers(0, 3))
def test_split_invariants_hold_as_catalogue_grows(rounds, seed):
    session = _fresh()
    counter = [0]
    before: dict[str, str] = {}
    test_before: set[str] = set()
    for rnd in rounds:
        _add_round(session, rnd, counter)
        assign_splits(session, ratios=RATIOS, seed=seed)
        now = _snapshot(session)
        # every patient has exactly one split (structural: the split is a patient column) ...
        assert all(split in SPLITS for split in now.values())
        # ... assigned once and never changed
        assert all(now[pid] == split for pid, split in before.items())
        # the test split only grows
        test_now = _test_images(session)
        assert test_before <= test_now
        # every image's split is its patient's, so no patient straddles splits
        per_patient = Counter()
        for pid, in session.execute(select(Image.patient_id)).all():
            per_patient[pid] += 1
        assert set(per_patient) == set(now)
        before, test_before = now, test_now


@hsettings(max_examples=30, deadline=None)
@given(rounds=rounds_strategy, seed=st.integers(0, 3))
def test_split_is_deterministic_for_the_same_history(rounds, seed):
    results = []
    for _ in range(2):
        session = _fresh()
        counter = [0]
        for rnd in rounds:
            _add_round(session, rnd, counter)
            assign_splits(session, ratios=RATIOS, seed=seed)
        results.append(_snapshot(session))
    assert results[0] == results[1]


@hsettings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), ratios=st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25)]))
def test_largest_deficit_keeps_each_split_within_one_patient_of_target(n, ratios):
    counts = {s: 0 for s in SPLITS}
    for total in range(1, n + 1):
        counts[choose_split(counts, ratios)] += 1
        for s, r in zip(SPLITS, ratios):
            assert abs(counts[s] - r * total) < 1.0 + 1e-9


def test_stratified_by_label_with_realistic_batch():
    session = _fresh()
    rnd = [(i, "normal", 1) for i in range(40)] + [(100 + i, "pneumonia", 2) for i in range(40)]
    _add_round(session, rnd, [0])
    assign_splits(session, ratios=RATIOS, seed=0)
    rows = session.execute(select(Patient.split, Image.label).join(Image)).all()
    patients = session.execute(select(Patient.patient_id, Patient.split)).all()
    by_label = Counter()
    for pid, split in patients:
        label = "normal" if int(pid[1:]) < 100 else "pneumonia"
        by_label[(label, split)] += 1
    for label in ("normal", "pneumonia"):
        assert by_label[(label, "train")] == 28
        assert by_label[(label, "val")] == 6
        assert by_label[(label, "test")] == 6
    assert rows


def test_new_images_of_known_patient_join_its_split():
    session = _fresh()
    counter = [0]
    _add_round(session, [(1, "normal", 1), (2, "normal", 1), (3, "normal", 1)], counter)
    assign_splits(session, ratios=RATIOS, seed=0)
    first = _snapshot(session)
    _add_round(session, [(1, "pneumonia", 2), (3, "normal", 1)], counter)
    assign_splits(session, ratios=RATIOS, seed=0)
    assert _snapshot(session) == first
    splits_of_p1 = set(session.scalars(select(Patient.split).join(Image).where(Image.patient_id == "p1")))
    assert splits_of_p1 == {first["p1"]}


def test_majority_label_breaks_ties_by_name():
    assert majority_label(Counter({"pneumonia": 2, "normal": 2})) == "normal"
    assert majority_label(Counter({"pneumonia": 3, "normal": 2})) == "pneumonia"


@hsettings(max_examples=30, deadline=None)
@given(films=st.lists(st.tuples(st.integers(0, 30),
                                st.sampled_from(["normal", "Normal", "b", "a_x", "aX", "é"])),
                      min_size=1, max_size=60),
       splits=st.lists(st.sampled_from([*SPLITS, None]), min_size=31, max_size=31))
def test_strata_counted_in_the_database_match_majority_label(films, splits):
    """The assigned patients' (stratum, split) counts that assign_splits reads from the database equal
    majority_label over each patient's films, ties and mixed-case labels included (PostgreSQL sorts
    with COLLATE "C" there, as Python sorts code points)."""
    from xray_core.data.split import assigned_per_stratum

    session = _fresh()
    labels: dict[str, Counter] = {}
    for k, (pnum, label) in enumerate(films):
        pid = f"p{pnum}"
        if pid not in labels:
            session.add(Patient(patient_id=pid, id_source="manifest", split=splits[pnum]))
            session.flush()
        labels.setdefault(pid, Counter())[label] += 1
        session.add(Image(sha256=f"{k:064x}", stored_path="s", label=label,
                          patient_id=pid, width=64, height=64, bit_depth=8, format="png", phash=0,
                          original_name="f", source_id=1))
    session.flush()
    want = Counter((majority_label(c), splits[int(pid[1:])]) for pid, c in labels.items()
                   if splits[int(pid[1:])] is not None)
    got = {(stratum, split): n for stratum, split, n in session.execute(assigned_per_stratum(session))}
    assert got == dict(want)
