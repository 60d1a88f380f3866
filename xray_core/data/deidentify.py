"""A de-identified copy of a DICOM file for the store (XRAY_DICOM_STORE=deidentified, the default).

Many hospitals may not keep identifiable copies outside the PACS. The copy follows the DICOM PS3.15
Basic Application Level Confidentiality Profile for what chest films carry: every person name (PN)
and private tag is removed, with the identifying attributes listed below; instance UIDs are replaced
by salted, deterministic UIDs (the same original gives the same copy, so re-ingesting is idempotent
and films of one study still share a StudyInstanceUID); PatientID becomes the catalogue's salted
patient id; InstitutionName follows XRAY_SITE_FROM_DICOM. Kept, because training and the per-site
and per-subgroup audits need them: pixel data, modality, body part, view, laterality, pixel
spacing, windowing, manufacturer and model, PatientSex, PatientAge and StudyDate.

Burned-in text in the pixels is *not* removed (out of scope; see SECURITY.md). The original's
sha256 still names the stored file, so deduplication works on what arrived, not on the copy.
"""

from __future__ import annotations

import hashlib
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from xray_core.data.dicom import patient_pseudonym, site_value

METHOD = "xray-retrain PS3.15 Basic Profile, salted UIDs and IDs"  # LO: at most 64 characters

# Removed (PS3.15 Table E.1-1 action X/Z/D) beyond every PN element, private tag and date/time.
REMOVED = (
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientMotherBirthName", "MedicalRecordLocator", "IssuerOfPatientID",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientSize",
    "PatientWeight", "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
    "PatientReligiousPreference", "PatientInsurancePlanCodeSequence", "ResponsibleOrganization",
    "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence", "StationName",
    "DeviceSerialNumber", "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription",
    "ImageComments", "RequestAttributesSequence", "RequestingService", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "ScheduledProcedureStepID", "AdmissionID", "CurrentPatientLocation", "PatientState",
    "ProtocolName", "DerivationDescription", "ReferencedPatientSequence", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "TextComments", "AdmittingDiagnosesDescription",
)
KEPT_DATES = {"StudyDate"}  # label-history order needs it; every other date and time is removed
_UID_EXTRA = {"IrradiationEventUID", "ConcatenationUID", "DimensionOrganizationUID", "StorageMediaFileSetUID"}


def _is_instance_uid(keyword: str) -> bool:
    """UIDs that identify this study/series/image (class and transfer-syntax UIDs are kept)."""
    return keyword.endswith("InstanceUID") or keyword.endswith("FrameOfReferenceUID") or keyword in _UID_EXTRA


def _new_uid(salt: str, old: str) -> str:
    """A 2.25 UID (PS3.5 B.2: a 128-bit integer) from sha256(salt:old): the same study keeps one UID."""
    return "2.25." + str(int(hashlib.sha256(f"{salt}:uid:{old}".encode()).hexdigest()[:32], 16))


def _scrub(ds: Dataset, salt: str) -> None:
    """Remove names, dates and listed identifiers and replace instance UIDs, in nested sequences too."""
    ds.remove_private_tags()
    for elem in list(ds):
        keyword = elem.keyword or ""
        if elem.VR == "SQ":
            for item in elem.value or ():
                _scrub(item, salt)
        if elem.VR == "PN" or keyword in REMOVED or (elem.VR in ("DA", "DT", "TM")
                                                     and keyword not in KEPT_DATES):
            del ds[elem.tag]
        elif elem.VR == "UI" and _is_instance_uid(keyword) and elem.value:
            elem.value = _new_uid(salt, str(elem.value))


def deidentify(data: bytes, *, salt: str, site_mode: str, patient_id: str | None = None) -> bytes:
    """The de-identified Part 10 copy of ``data`` (same transfer syntax, pixel data byte for byte).

    ``patient_id``: what replaces PatientID; None = the salted pseudonym of the file's own PatientID
    (what the catalogue uses). Deterministic: the same bytes, salt and settings give the same copy.
    """
    ds = pydicom.dcmread(BytesIO(data), force=False)
    institution = ds.get("InstitutionName")
    if patient_id is None:
        raw_id = str(ds.get("PatientID", "") or "").strip()
        patient_id = patient_pseudonym(salt, raw_id) if raw_id else ""
    _scrub(ds, salt)
    meta = ds.file_meta
    if meta.get("MediaStorageSOPInstanceUID") and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    site = site_value(str(institution) if institution else None, salt=salt, site_mode=site_mode)
    if site:
        ds.InstitutionName = site
    elif "InstitutionName" in ds:
        del ds.InstitutionName
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


__all__ = ["deidentify", "REMOVED", "KEPT_DATES", "METHOD"]
