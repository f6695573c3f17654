from setuptools import find_packages, setup


def version():
    scope = {}
    with open('mmcd/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


def requirements(path):
    with open(path) as f:
        return [line.strip() for line in f
                if line.strip() and not line.startswith(('#', '-'))]


setup(
    name='mmcd',
    version=version(),
    description='Colinearity Decay and low-bit quantization for '
    'vision-transformer detectors in MMDetection',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'configs', 'tools')),
    python_requires='>=3.10',
    # torch, mmcv and mmdet are checked, not pulled: tools/setup_env.sh
    # installs them in the right order (torch first, mmcv built against it).
    install_requires=['numpy', 'pycocotools', 'opencv-python', 'matplotlib'],
    extras_require=dict(
        tests=requirements('requirements/tests.txt')),
    license='Apache License 2.0',
)
