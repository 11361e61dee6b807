"""The DICOM node: a C-STORE SCP that reads what the PACS sends, asks TorchServe, and answers with a DICOM
Structured Report (and a FHIR DiagnosticReport). docs/dicom.md has its conformance in short.

    eligibility -> which received instances are for a model, and why the others are skipped
    spool       -> the durable queue (written before the C-STORE is acknowledged) and the audit log
    results     -> the SR and FHIR documents, with UIDs derived from the source instance and the model
    config      -> the node's options (command line and TOML)
    node        -> the SCP, the worker that drains the queue, `cxr dicom-node` and `cxr audit`
"""
