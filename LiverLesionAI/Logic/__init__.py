"""LiverLesionAI engine: Qt-free logic shared by the 3D Slicer module and the command line.

Imported as ``liverlesionai`` everywhere: pip maps this folder to that name, and the Slicer module
loads it under the same name (see ``LiverLesionAI.py``), so it never collides with another
extension's ``Logic`` package. Only relative imports are used inside.
"""

__version__ = "0.1.0"
