"""LiverLesionAI: liver and per-lesion segmentation and typing on abdominal CT, with interactive review.

A thin shell: every control calls one function of the Qt-free layer (``liverlesionai.mrml``, the folder
``Logic/``), which is tested without Slicer on the slicer-core wheel. Segment & Classify runs in a
separate process (``Logic/slicer_worker.py``); the result enters the scene only when that run succeeds.
"""

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_LOGIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Logic")


def _engine_package():
    """``liverlesionai`` (the Logic folder), imported under that unique name, never as ``Logic``."""
    if "liverlesionai" not in sys.modules and importlib.util.find_spec("liverlesionai") is None:
        spec = importlib.util.spec_from_file_location(
            "liverlesionai", os.path.join(_LOGIC_DIR, "__init__.py"), submodule_search_locations=[_LOGIC_DIR])
        module = importlib.util.module_from_spec(spec)
        sys.modules["liverlesionai"] = module
        spec.loader.exec_module(module)
    import liverlesionai
    return liverlesionai


_engine_package()
# Only modules that need numpy alone: torch, scipy... may not be installed yet (they are imported on use).
from liverlesionai import mrml, slicer_worker  # noqa: E402
from liverlesionai.selftest import failed_checks, run_review_scenario  # noqa: E402
from liverlesionai.terminology import TERMINOLOGY_FILE  # noqa: E402

PHANTOM_NAME = "LiverLesionAI phantom"
SHIPPED_VERSION = "shipped"  # liverlesionai.registry.SHIPPED_VERSION (that module imports torch)


class LiverLesionAI(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiverLesionAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor", "Terminologies"]
        self.parent.contributors = ["LiverLesionAI contributors"]
        self.parent.helpText = _(
            "Segments the liver and each liver lesion on an abdominal CT and types every lesion (cyst, "
            "hemangioma, metastasis) with a probability. Review the lesions in the table: click a row to "
            "centre the views, change the type, confirm or reject, correct masks in the embedded Segment "
            "Editor. Research use only, not for diagnosis. See the README of the extension.")
        self.parent.acknowledgementText = _(
            "Tested on the 3D-IRCADb-01 CT of IRCAD France. The shipped model is trained only on synthetic "
            "phantoms the project generates itself.")
        slicer.app.connect("startupCompleted()", _onStartupCompleted)


def _onStartupCompleted():
    slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    import SampleData
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="LiverLesionAI", sampleName=PHANTOM_NAME, uris=None, fileNames=None,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "LiverLesionAI.png"),
        customDownloader=lambda source: loadPhantom())


def loadPhantom(seed=1):
    """The synthetic test CT, generated locally (no download), as a volume node."""
    from liverlesionai.phantom import generate_phantom_ct
    ct, _truth = generate_phantom_ct(seed, max_in_plane=256)
    node = mrml.volume_node_from_ct(slicer.mrmlScene, ct, PHANTOM_NAME)
    slicer.util.setSliceViewerLayers(background=node, fit=True)
    return node


@parameterNodeWrapper
class LiverLesionAIParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    model: str = SHIPPED_VERSION
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    segmentation: vtkMRMLSegmentationNode


class LiverLesionAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._records = []
        self._editTimer = qt.QTimer()
        self._editTimer.setSingleShot(True)
        self._editTimer.setInterval(700)  # measure once the brush stops, not on every stroke
        self._editTimer.connect("timeout()", self.updateTable)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverLesionAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverLesionAILogic()
        self.ui.progressBar.hide()
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.modelComboBox.addItems(self.logic.modelVersions())
        self.ui.lesionTable.setColumnCount(len(mrml.TABLE_COLUMNS))
        self.ui.lesionTable.setHorizontalHeaderLabels(list(mrml.TABLE_COLUMNS))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, lambda *a: self.setParameterNode(None))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.lesionsInLiverButton.connect("clicked(bool)", lambda: self.onApply(inReviewedLiver=True))
        self.ui.cancelButton.connect("clicked(bool)", self.logic.cancel)
        self.ui.modelComboBox.connect("currentTextChanged(QString)", self.onModelChanged)
        self.ui.lesionTable.connect("cellClicked(int,int)", self.onRowClicked)
        self.ui.confirmButton.connect("clicked(bool)", lambda: self.onReview(mrml.set_review_status, "confirmed"))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.onReview(mrml.set_review_status, "rejected"))
        self.ui.undoReviewButton.connect("clicked(bool)", lambda: self.onReview(mrml.undo_review_status))
        self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.finetuneProgressBar.hide()
        self.ui.exportButton.connect("clicked(bool)", self.onExportCase)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.finetuneCancelButton.connect("clicked(bool)", self.logic.cancelFinetune)
        self.ui.activateButton.connect("clicked(bool)", self.onActivateVersion)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.initializeParameterNode()

    def cleanup(self):
        self.logic.cancel()
        self.logic.cancelFinetune()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.modelComboBox.setCurrentText(self._parameterNode.model)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        self.ui.applyButton.enabled = bool(p and p.inputVolume) and not self.logic.isRunning()
        self.ui.lesionsInLiverButton.enabled = self.ui.applyButton.enabled and bool(p.segmentation)
        seg = p.segmentation if p else None
        if seg is not self.ui.segmentEditorWidget.segmentationNode():
            self.ui.segmentEditorWidget.setSegmentationNode(seg)
            self.ui.segmentEditorWidget.setSourceVolumeNode(p.inputVolume if p else None)
            self.removeObservers(self.onSegmentsEdited)
            if seg:
                self.addObserver(seg.GetSegmentation(), slicer.vtkSegmentation.RepresentationModified, self.onSegmentsEdited)
                self.addObserver(seg.GetSegmentation(), slicer.vtkSegmentation.SegmentAdded, self.onSegmentsEdited)
            self.updateTable()

    def onModelChanged(self, text):
        if self._parameterNode and text:
            self._parameterNode.model = text
        self.showVersionSummary(text)

    # --- improving the model: export, fine-tune, choose the version in use ---------------------
    def showVersionSummary(self, version):
        """Before/after validation metrics of ``version``, with a warning when it is worse than its parent."""
        if not version or not self.logic.torchAvailable():
            self.ui.comparisonLabel.text = ""
            return
        from liverlesionai.finetune import version_summary
        try:
            text, worse = version_summary(version)
        except Exception as error:  # a damaged card must not break the panel
            text, worse = str(error), True
        self.ui.comparisonLabel.text = (("WARNING: this version is worse than the one it was fine-tuned from "
                                         "on some validation metric.\n") if worse and version != SHIPPED_VERSION
                                        else "") + text
        self.ui.comparisonLabel.setStyleSheet("color: #d55e00" if worse and version != SHIPPED_VERSION else "")

    def refreshModelVersions(self, select=None):
        current = select or self.ui.modelComboBox.currentText
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItems(self.logic.modelVersions())
        self.ui.modelComboBox.setCurrentText(current)

    def onExportCase(self):
        with slicer.util.tryWithErrorDisplay(_("Could not export the reviewed case."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            if not (p and p.inputVolume and p.segmentation):
                raise ValueError(_("Choose the CT and its reviewed segmentation first."))
            info = self.logic.exportCase(self.ui.datasetPathLineEdit.currentPath, p.inputVolume, p.segmentation)
            self.ui.finetuneStatusLabel.text = _("Exported case {0} (revision {1}).").format(info.case_id, info.revision)

    def onFinetune(self):
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            self.logic.startFinetune(self.ui.datasetPathLineEdit.currentPath, self._parameterNode.device,
                                     self.onFinetuneProgress, self.onFinetuneFinished)
            self.ui.finetuneProgressBar.show()
            self.ui.finetuneButton.enabled, self.ui.finetuneCancelButton.enabled = False, True

    def onFinetuneProgress(self, fraction, message):
        self.ui.finetuneProgressBar.value = int(round(100 * fraction))
        self.ui.finetuneStatusLabel.text = message

    def onFinetuneFinished(self, version, message):
        self.ui.finetuneProgressBar.hide()
        self.ui.finetuneButton.enabled, self.ui.finetuneCancelButton.enabled = True, False
        self.ui.finetuneStatusLabel.text = message
        if version:
            self.refreshModelVersions(select=version)  # shows its before/after metrics; not active yet

    def onActivateVersion(self):
        with slicer.util.tryWithErrorDisplay(_("Could not switch the model version.")):
            version = self.ui.modelComboBox.currentText
            from liverlesionai.finetune import activate_version, version_summary
            _text, worse = version_summary(version)
            if worse and not slicer.util.confirmYesNoDisplay(
                    _("Version {0} is worse than its parent on some validation metric. Use it anyway?").format(version)):
                return
            activate_version(version)
            self.ui.finetuneStatusLabel.text = _("Model in use: {0}").format(version)

    def onRollback(self):
        with slicer.util.tryWithErrorDisplay(_("Could not roll back the model version.")):
            from liverlesionai.finetune import rollback_version
            version = rollback_version()
            self.refreshModelVersions(select=version)
            self.ui.finetuneStatusLabel.text = _("Model in use: {0}").format(version)

    def onApply(self, inReviewedLiver=False):
        with slicer.util.tryWithErrorDisplay(_("Segment & Classify could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            self.ui.progressBar.show()
            self.logic.startSegmentation(p.inputVolume, p.model, p.device, self.onProgress, self.onFinished,
                                         liverSegmentation=p.segmentation if inReviewedLiver else None)
            self.ui.applyButton.enabled = self.ui.lesionsInLiverButton.enabled = False
            self.ui.cancelButton.enabled = True

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onFinished(self, segNode, message):
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = message
        if segNode is not None:
            self._parameterNode.segmentation = segNode
        self.onParameterNodeModified()

    def onSegmentsEdited(self, caller=None, event=None):
        self._editTimer.start()

    def updateTable(self):
        p = self._parameterNode
        self._records = []
        if p and p.segmentation and p.inputVolume:
            with slicer.util.tryWithErrorDisplay(_("Could not measure the lesions.")):
                self._records = mrml.refresh_measurements(p.segmentation, p.inputVolume)
        table = self.ui.lesionTable
        table.setRowCount(len(self._records))
        for row, cells in enumerate(mrml.table_rows(self._records)):
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
            if cells[1] in mrml.LESION_TYPES:  # an unclassified lesion gets a type with Classify
                typeBox = qt.QComboBox()
                typeBox.addItems(list(mrml.LESION_TYPES))
                typeBox.setCurrentText(cells[1])
                typeBox.connect("activated(int)", lambda index, r=row, box=typeBox: self.onTypeChanged(r, box.itemText(index)))
                table.setCellWidget(row, 1, typeBox)

    def _selectedSegmentId(self, row=None):
        row = self.ui.lesionTable.currentRow() if row is None else row
        if not 0 <= row < len(self._records):
            raise ValueError(_("Select a lesion in the table first."))
        return mrml.segment_id_for_lesion(self._parameterNode.segmentation, self._records[row].lesion_id)

    def onRowClicked(self, row, column):
        x, y, z = mrml.lesion_centroid_ras(self._records[row])
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)

    def onTypeChanged(self, row, lesionType):
        with slicer.util.tryWithErrorDisplay(_("Could not change the lesion type.")):
            mrml.set_lesion_type(self._parameterNode.segmentation, self._selectedSegmentId(row), lesionType)
        self.updateTable()

    def onReview(self, action, *args):
        with slicer.util.tryWithErrorDisplay(_("Could not change the review status.")):
            action(self._parameterNode.segmentation, self._selectedSegmentId(), *args)
        self.updateTable()

    def onClassify(self):
        with slicer.util.tryWithErrorDisplay(_("Could not classify the lesion."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            mrml.classify_segment(self.logic.engine(p.model, p.device), p.segmentation,
                                  self.ui.segmentEditorWidget.currentSegmentID(), p.inputVolume)
        self.updateTable()


    def onExplain(self):
        with slicer.util.tryWithErrorDisplay(_("Could not explain the lesion type."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            self.logic.startExplanation(p.inputVolume, p.segmentation, self._selectedSegmentId(), p.model, p.device,
                                        self.onProgress, self.onExplained)
            self.ui.progressBar.show()
            self.ui.applyButton.enabled = self.ui.lesionsInLiverButton.enabled = self.ui.explainButton.enabled = False
            self.ui.cancelButton.enabled = True

    def onExplained(self, attributionNode, message):
        self.ui.explainButton.enabled = True
        if attributionNode is not None:
            slicer.util.setSliceViewerLayers(foreground=attributionNode, foregroundOpacity=0.7)
        self.onFinished(None, message)


class LiverLesionAILogic(ScriptedLoadableModuleLogic):
    """Qt parts only: the worker process, dependency install, the engine for on-demand typing."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._process = None
        self._workDir = None
        self._engines = {}
        self._finetuneProcess = None

    def getParameterNode(self):
        return LiverLesionAIParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("LiverLesionAI", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag("LiverLesionAI")
            node = slicer.mrmlScene.AddNode(node)
        return node

    def modelVersions(self):
        try:
            from liverlesionai.registry import ModelRegistry
        except ImportError:  # PyTorch not installed yet: only the shipped model can be offered
            return [SHIPPED_VERSION]
        return [info.version for info in ModelRegistry().list_versions() if not info.problem] or [SHIPPED_VERSION]

    def ensureDependencies(self):
        """Install what the engine needs, only after asking (never at import time)."""
        try:
            import PyTorchUtils  # the PyTorch extension picks the CUDA build that fits this machine
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=True) is None:
                raise RuntimeError(_("PyTorch is required; install it from the PyTorch extension."))
        except ImportError:
            pass  # then pip installs torch with the other requirements below
        requirements = self.resourcePath("requirements.txt")
        try:
            import slicer.packaging
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements), requester="LiverLesionAI")
        except ImportError:  # Slicer before 5.11
            missing = slicer_worker.missing_requirements(requirements)
            if missing and slicer.util.confirmOkCancelDisplay(
                    _("LiverLesionAI needs these Python packages:\n{0}\nInstall them now?").format("\n".join(missing))):
                slicer.util.pip_install(missing)
            elif missing:
                raise RuntimeError(_("Python packages missing: {0}").format(", ".join(missing)))

    def resourcePath(self, relativePath):
        return os.path.join(os.path.dirname(__file__), "Resources", relativePath)

    def modelPath(self, version):
        from liverlesionai.registry import ModelRegistry
        return str(ModelRegistry().model_dir(version))

    def engine(self, version, device):
        from liverlesionai.engine import LiverLesionEngine  # imports torch: only once it is installed
        key = (version, device)
        if key not in self._engines:
            self._engines[key] = LiverLesionEngine(model=self.modelPath(version), device=device,
                                                       threads=slicer_worker.default_threads())
        return self._engines[key]

    def isRunning(self):
        return self._process is not None

    def startSegmentation(self, volumeNode, version, device, onProgress, onFinished, liverSegmentation=None):
        """Segment & Classify in a background process; with ``liverSegmentation``, lesions are searched inside
        its reviewed liver (slicer_worker.write_liver_mask_for_worker) and the result is a new node."""
        if self.isRunning():
            raise RuntimeError(_("A segmentation or explanation is already running."))
        self._workDir = tempfile.mkdtemp(prefix="LiverLesionAI-")
        try:
            ctPath = slicer_worker.write_volume_for_worker(volumeNode, self._workDir)
            maskPath = (slicer_worker.write_liver_mask_for_worker(liverSegmentation, volumeNode, self._workDir)
                        if liverSegmentation is not None else None)
        except Exception:
            shutil.rmtree(self._workDir, ignore_errors=True)
            raise
        resultName = (_("{0} lesions in reviewed liver").format(volumeNode.GetName())
                      if liverSegmentation is not None else None)
        args = slicer_worker.segment_command(ctPath, os.path.join(self._workDir, "out"), self.modelPath(version), device,
                                             liver_mask=maskPath)

        def loadResult(outDir):
            segNode = slicer_worker.load_worker_result(slicer.mrmlScene, volumeNode, outDir, resultName)
            mrml.show_surfaces(segNode)
            return segNode, _("Done: {0} lesion(s).").format(len(mrml.lesion_segment_ids(segNode)))

        self._startWorker(args, onProgress, loadResult, onFinished)

    def startExplanation(self, volumeNode, segNode, segmentId, version, device, onProgress, onFinished):
        """Integrated-Gradients map of why stage 2 gives the (reviewed) lesion segment its type, in a background
        process; onFinished(attribution volume node or None, message)."""
        if self.isRunning():
            raise RuntimeError(_("A segmentation or explanation is already running."))
        lesionId, lesionType = mrml.explanation_target(segNode, segmentId)
        self._workDir = tempfile.mkdtemp(prefix="LiverLesionAI-")
        try:
            ctPath = slicer_worker.write_volume_for_worker(volumeNode, self._workDir)
            maskPath = slicer_worker.write_segment_mask_for_worker(segNode, segmentId, volumeNode, self._workDir)
        except Exception:
            shutil.rmtree(self._workDir, ignore_errors=True)
            raise
        args = slicer_worker.explain_command(ctPath, maskPath, lesionId, lesionType, os.path.join(self._workDir, "out"),
                                             self.modelPath(version), device)

        def loadResult(outDir):
            name = _("{0} lesion {1} {2} attribution").format(volumeNode.GetName(), lesionId, lesionType)
            node = slicer_worker.load_worker_explanation(slicer.mrmlScene, outDir, name)
            return node, _("Red: voxels that make stage 2 call lesion {0} {1}; blue: against.").format(lesionId, lesionType)

        self._startWorker(args, onProgress, loadResult, onFinished)

    def _startWorker(self, args, onProgress, loadResult, onFinished):
        """Run the worker in ``self._workDir``; on success loadResult(output folder) -> (node, message) puts its
        result in the scene. Cancelled or failed: the scene is unchanged. Then onFinished(node or None, message)."""
        self._process = process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        output, pending = [], [""]

        def readOutput():
            text = pending[0] + process.readAllStandardOutput().data().decode("utf-8", "replace")
            *lines, pending[0] = text.split("\n")  # keep a half-received line for the next read
            for line in lines:
                progress = slicer_worker.parse_progress_line(line)
                onProgress(*progress) if progress else output.append(line)

        def finished(exitCode, exitStatus):
            readOutput()
            output.append(pending[0])
            node, message = None, _("Cancelled: the scene is unchanged.")
            if not process.property("cancelled"):
                try:
                    if exitStatus != qt.QProcess.NormalExit or exitCode != 0:
                        raise RuntimeError("\n".join(output[-15:]) or _("The background process failed."))
                    node, message = loadResult(os.path.join(self._workDir, "out"))
                except Exception as error:
                    logging.error(str(error))
                    message = _("Failed: {0}").format(error)
            self._process = None
            shutil.rmtree(self._workDir, ignore_errors=True)
            onFinished(node, message)

        process.connect("readyReadStandardOutput()", readOutput)
        process.connect("finished(int,QProcess::ExitStatus)", finished)
        process.start(args[0], args[1:])

    def cancel(self):
        if self._process is not None:
            self._process.setProperty("cancelled", True)
            self._process.kill()

    def torchAvailable(self):
        return importlib.util.find_spec("torch") is not None

    def exportCase(self, datasetDir, volumeNode, segNode):
        from liverlesionai.finetune import export_reviewed_case
        if not datasetDir:
            raise ValueError(_("Choose a training data folder first."))
        workDir = tempfile.mkdtemp(prefix="LiverLesionAI-export-")
        try:
            return export_reviewed_case(datasetDir, volumeNode, segNode, workDir)
        finally:
            shutil.rmtree(workDir, ignore_errors=True)

    def startFinetune(self, datasetDir, device, onProgress, onFinished):
        """Fine-tune in a background process; onFinished(new version or None, message). Cancel kills it:
        the new version is saved atomically at the very end, so a kill leaves the models as they were."""
        from liverlesionai.finetune import finetune_command
        if self._finetuneProcess is not None:
            raise RuntimeError(_("A fine-tuning is already running."))
        if not datasetDir:
            raise ValueError(_("Choose a training data folder first."))
        args = finetune_command(datasetDir, device=device)
        self._finetuneProcess = process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.SeparateChannels)
        state = {"pending": "", "version": None, "output": []}

        def readOutput():
            text = state["pending"] + process.readAllStandardOutput().data().decode("utf-8", "replace")
            *lines, state["pending"] = text.split("\n")
            for line in lines:
                progress = slicer_worker.parse_progress_line(line)
                if progress:
                    onProgress(*progress)
                    if progress[1].startswith("Saved v"):
                        state["version"] = progress[1].split()[1]

        def readErrors():
            state["output"].extend(process.readAllStandardError().data().decode("utf-8", "replace").splitlines())

        def finished(exitCode, exitStatus):
            readOutput()
            readErrors()
            version, message = None, _("Cancelled: no new model version was saved.")
            if not process.property("cancelled"):
                if exitStatus == qt.QProcess.NormalExit and exitCode == 0 and state["version"]:
                    version = state["version"]
                    message = _("New version {0} saved. Compare it below and choose whether to use it.").format(version)
                else:
                    message = _("Fine-tuning failed: {0}").format("\n".join(state["output"][-8:]))
                    logging.error(message)
            self._finetuneProcess = None
            onFinished(version, message)

        process.connect("readyReadStandardOutput()", readOutput)
        process.connect("readyReadStandardError()", readErrors)
        process.connect("finished(int,QProcess::ExitStatus)", finished)
        process.start(args[0], args[1:])

    def cancelFinetune(self):
        if self._finetuneProcess is not None:
            self._finetuneProcess.setProperty("cancelled", True)
            self._finetuneProcess.kill()


class LiverLesionAITest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentAndReview()
        self.setUp()
        self.test_BackgroundRunAndCancel()

    def test_SegmentAndReview(self):
        self.delayDisplay("Segment & Classify on the LiverLesionAI phantom, then review")
        logic = LiverLesionAILogic()
        logic.ensureDependencies()
        volumeNode = loadPhantom()
        checks = run_review_scenario(slicer.mrmlScene, volumeNode, logic.engine(SHIPPED_VERSION, "cpu"))
        self.assertEqual(failed_checks(checks), [], checks.get("_details"))
        self.delayDisplay("Test passed")

    def test_BackgroundRunAndCancel(self):
        volumeNode = loadPhantom()
        logic, done = LiverLesionAILogic(), []
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic.startSegmentation(volumeNode, SHIPPED_VERSION, "cpu", lambda f, m: None, lambda n, m: done.append(n))
        logic.cancel()
        self._waitFor(done)
        self.assertIsNone(done[0])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)  # cancelling leaves the scene as it was
        done.clear()
        logic.startSegmentation(volumeNode, SHIPPED_VERSION, "cpu", lambda f, m: None, lambda n, m: done.append(n))
        self._waitFor(done)
        self.assertIsNotNone(done[0])
        self.assertIn("liver", list(done[0].GetSegmentation().GetSegmentIDs()))

    def _waitFor(self, done, timeoutSeconds=900):
        timer = qt.QElapsedTimer()
        timer.start()
        while not done and timer.elapsed() < timeoutSeconds * 1000:
            slicer.app.processEvents()
            qt.QThread.msleep(50)
        self.assertTrue(done, "the background segmentation did not finish in time")
